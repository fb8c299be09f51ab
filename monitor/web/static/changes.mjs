// Live timeline: new rows arrive over Server-Sent Events and are inserted as text (never HTML).
const table = document.getElementById("changes");
const liveState = document.getElementById("live-state");

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
}

function addRow(r) {
  const body = table.tBodies[0];
  if (r.event_id && body.querySelector(`tr[data-event="${CSS.escape(r.event_id)}"]`)) return;
  const tr = document.createElement("tr");
  tr.dataset.id = r.id;
  tr.dataset.event = r.event_id || "";
  tr.className = "fresh";
  tr.append(cell(r.time), cell(r.tenant));
  const type = cell("");
  const code = document.createElement("code");
  code.textContent = r.type;
  type.append(code);
  const ent = cell("");
  const a = document.createElement("a");
  a.className = "entity-link";
  a.href = `/entities/${encodeURIComponent(r.subject)}?tenant=${encodeURIComponent(r.tenant)}`;
  a.textContent = r.name;
  ent.append(a);
  tr.append(type, ent, cell(r.summary));
  body.prepend(tr);
}

if (table && table.dataset.stream) {
  const source = new EventSource(table.dataset.stream);
  source.addEventListener("change", (evt) => addRow(JSON.parse(evt.data)));
  source.addEventListener("open", () => { if (liveState) liveState.textContent = "live"; });
  source.addEventListener("error", () => { if (liveState) liveState.textContent = "reconnecting…"; });
}
