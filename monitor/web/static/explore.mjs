import { makeGraph, addElements } from "/static/graph.mjs";

const views = document.querySelectorAll("[data-view]");
let graph = null;

function show(name) {
  for (const sec of document.querySelectorAll("section.view")) sec.hidden = sec.id !== `view-${name}`;
  if (name === "graph" && !graph) {
    const pre = document.getElementById("result-json");
    const doc = JSON.parse(pre.textContent);
    const rows = (doc.data || []).filter((r) => r && typeof r === "object" && r._key);
    graph = makeGraph(document.getElementById("graph"), document.getElementById("graph-note"));
    const cap = 100;
    addElements(graph, {
      nodes: rows.slice(0, cap).map((r) => ({ data: { id: r._key, label: String(r.displayName || r._key).slice(0, 60),
        type: r._type, href: `/entities/${encodeURIComponent(r._key)}` } })),
      edges: [],
      truncated: Math.max(0, rows.length - cap),
    });
  }
}

for (const a of views) {
  a.addEventListener("click", (evt) => {
    evt.preventDefault();
    history.replaceState(null, "", `#${a.dataset.view}`);
    show(a.dataset.view);
  });
}
if (views.length) show((location.hash || "#table").slice(1));
