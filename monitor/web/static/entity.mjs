import { makeGraph, expand } from "/static/graph.mjs";

const box = document.getElementById("graph");
if (box) {
  const state = makeGraph(box, document.getElementById("graph-note"));
  expand(state, box.dataset.key, box.dataset.tenant);
}
