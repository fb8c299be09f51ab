// Cross-check: run integration-sdk-testing 9.11.1's own matchers on an export JSON file.
const fs = require('fs');
const m = require(process.cwd() + '/sdkjest.js');
const data = JSON.parse(fs.readFileSync(process.argv[2]));
const byType = {};
for (const e of data.entities) (byType[e._type] = byType[e._type] || []).push(e);
let failures = 0;
for (const [t, ents] of Object.entries(byType)) {
  let bad = 0, first = null;
  for (const e of ents) {
    const r = m.toMatchGraphObjectSchema(e, { _class: e._class });
    if (!r.pass) { bad++; if (!first) first = r.message().slice(-900); }
  }
  console.log(t, ents.length, 'fail', bad); if (first) console.log(first);
  failures += bad;
}
const rb = {};
for (const r of data.relationships) (rb[r._type] = rb[r._type] || []).push(r);
for (const [t, rels] of Object.entries(rb)) {
  let bad = 0, first = null;
  for (const r of rels) {
    const res = m.toMatchDirectRelationshipSchema([JSON.parse(JSON.stringify(r))]);
    if (!res.pass) { bad++; if (!first) first = res.message().slice(-600); }
  }
  console.log(t, rels.length, 'fail', bad); if (first) console.log(first);
  failures += bad;
}
console.log('TOTAL failures', failures);
