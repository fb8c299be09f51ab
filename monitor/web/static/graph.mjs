// Neighbourhood graphs with the vendored Cytoscape.js: nodes link to their entity page,
// clicking a node adds its own neighbours (expand-on-click), capped by the server.
import cytoscape from "/static/vendor/cytoscape.esm.min.mjs";

const COLOURS = {
  microsoft_defender_machine: "#1f5fbf",
  microsoft_defender_vulnerability: "#b42318",
  microsoft_defender_logon_user: "#7a5af8",
  microsoft_defender_user: "#7a5af8",
  user_endpoint: "#0e9384",
  microsoft_defender_account: "#344054",
};

export const MAX_NODES = 400;

export function makeGraph(container, note) {
  const cy = cytoscape({
    container,
    elements: [],
    wheelSensitivity: 0.3,
    style: [
      { selector: "node", style: { label: "data(label)", "font-size": 9, width: 14, height: 14,
        "background-color": (n) => COLOURS[n.data("type")] || "#98a2b3", color: "#1d2330",
        "text-wrap": "ellipsis", "text-max-width": 120 } },
      { selector: "node[?center]", style: { width: 24, height: 24, "border-width": 3, "border-color": "#f79009" } },
      { selector: "edge", style: { width: 1, "line-color": "#d0d5dd", "target-arrow-shape": "triangle",
        "target-arrow-color": "#d0d5dd", "curve-style": "bezier", label: "data(label)", "font-size": 7, color: "#667085" } },
    ],
  });
  const state = { cy, note, truncated: 0 };
  cy.on("tap", "node", async (evt) => {
    const node = evt.target;
    if (evt.originalEvent && (evt.originalEvent.ctrlKey || evt.originalEvent.metaKey)) {
      window.location.href = node.data("href");
      return;
    }
    await expand(state, node.id(), node.data("tenant"));
  });
  cy.on("dbltap", "node", (evt) => { window.location.href = evt.target.data("href"); });
  return state;
}

export function addElements(state, doc) {
  const cy = state.cy;
  const fresh = [];
  for (const n of doc.nodes) {
    if (cy.nodes().length + fresh.length >= MAX_NODES) { state.truncated += 1; continue; }
    if (cy.getElementById(n.data.id).empty()) fresh.push({ group: "nodes", data: { ...n.data, tenant: doc.tenant } });
  }
  cy.add(fresh);
  const edges = [];
  for (const e of doc.edges) {
    if (cy.getElementById(e.data.id).empty() && !cy.getElementById(e.data.source).empty()
        && !cy.getElementById(e.data.target).empty()) edges.push({ group: "edges", data: e.data });
  }
  cy.add(edges);
  state.truncated += doc.truncated || 0;
  cy.layout({ name: "cose", animate: false, randomize: false }).run();
  if (state.note) {
    state.note.textContent = `${cy.nodes().length} nodes, ${cy.edges().length} edges`
      + (state.truncated ? `; ${state.truncated} more not shown` : "")
      + " · click a node to expand it, double-click to open it";
  }
  document.body.dataset.graphReady = "1";
}

export async function expand(state, key, tenant) {
  const url = `/api/graph?key=${encodeURIComponent(key)}` + (tenant ? `&tenant=${encodeURIComponent(tenant)}` : "");
  const resp = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (!resp.ok) return;
  addElements(state, await resp.json());
}
