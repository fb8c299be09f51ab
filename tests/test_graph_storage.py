"""The graph's compact storage: relationship rows and scopes stored only where they differ
from the type's default read back exactly what was stored."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from monitor.config import TenantConfig
from monitor.detect import diff
from monitor.model import schema
from monitor.model.builder import GraphBuilder
from monitor.model.graph import (
    Graph,
    Relationships,
    canonical_print,
    default_scope,
    entry_class,
    entry_ends,
    entry_item,
)
from monitor.model.raw import RawData, canonical_json
from monitor.model.vulnerabilities import machine_vulnerability_relationship
from monitor.query.result import public

MACHINE = schema.MACHINE.key("m1")
CVE = schema.VULNERABILITY.key("CVE-2024-1")


def pair(products: list[str] | None = None) -> dict[str, object]:
    return machine_vulnerability_relationship(MACHINE, CVE, products or ["contoso app 1.0"])


def mapped() -> dict[str, object]:
    return {
        "_key": f"{CVE}|is|cve-2024-1",
        "_type": "microsoft_defender_vulnerability_is_cve",
        "_class": "IS",
        "_mapping": {"sourceEntityKey": CVE, "targetEntity": {"_key": "cve-2024-1"}},
    }


def test_rows_read_back_what_was_stored() -> None:
    rels = Relationships()
    rel, other = pair(), mapped()
    rels[rel["_key"]] = rel
    rels[other["_key"]] = other
    assert rels[rel["_key"]] == rel
    assert list(rels[rel["_key"]]) == list(rel)  # field order kept
    assert rels[other["_key"]] is other  # nested values: kept as they are
    assert rels.endpoints(rel["_key"]) == (MACHINE, CVE)
    assert rels.endpoints("nope") is None
    assert rels.type_of(rel["_key"]) == rel["_type"]
    assert [r["_key"] for r in rels.of_type(str(rel["_type"]))] == [rel["_key"]]
    assert len(rels) == 2 and set(rels) == {rel["_key"], other["_key"]}


def test_a_row_carries_the_print_the_diff_would_make() -> None:
    rels = Relationships()
    rel = pair()
    key = str(rel["_key"])
    rels[key] = rel
    (row,) = rels.rows([key])
    assert row is not None
    typ, fp, fields = row
    assert typ == rel["_type"] and set(fields) == set(rel)
    assert fp == canonical_print(rel) == diff.fingerprint(rel)[0]
    rels[key] = pair(["other app 2.0"])  # replaced: a new print
    assert rels.rows([key])[0][1] != fp


def test_a_row_holds_only_what_its_shape_does_not() -> None:
    """A converter's relationship keeps its values in the row and its `_type`, `_class`,
    `displayName` (the class) and derivable `_key` in the shared shape; any other relationship
    keeps what it does not share, and every one reads back field for field, in order."""
    rels = Relationships()
    rel = pair()
    key = str(rel["_key"])
    row = rels.put(key, rel)
    assert isinstance(row, tuple)
    assert row[2:] == (MACHINE, CVE, "contoso app 1.0")  # ends and products only
    other = machine_vulnerability_relationship(MACHINE, schema.VULNERABILITY.key("CVE-2"), ["x"])
    assert rels.put(str(other["_key"]), other)[0] is row[0]  # one shape for both
    odd_key = {**rel, "_key": "pair-1"}  # a key of its own
    named = {**rel, "_key": "pair-2", "displayName": "found on"}  # a label of its own
    mixed = {**rel, "_key": "pair-3", "_class": 7}  # not a string class
    for item in (odd_key, named, mixed):
        stored = rels.put(str(item["_key"]), item)
        assert isinstance(stored, tuple)
        got = rels[str(item["_key"])]
        assert got == item and list(got) == list(item)
        assert entry_class(stored) == item["_class"] and entry_ends(stored) == (MACHINE, CVE)
        assert rels.rows([str(item["_key"])]) == [
            (item["_type"], canonical_print(item), tuple(item))
        ]
    assert "pair-1" in rels.put("pair-1", odd_key)  # the key is held when not derivable
    assert "found on" in rels.put("pair-2", named)
    assert rels[key] == rel and list(rels[key]) == list(rel)
    assert rels.put("other-key", rel)[2] == key  # stored under another key: its own kept
    for lone in ({"_type": "t"}, {"_type": 7}, {"_type": "a"}):  # a shape of one field
        rels.put("lone", lone)
        assert rels["lone"] == lone and rels.type_of("lone") == lone["_type"]


def test_a_read_relationship_is_a_copy() -> None:
    rels = Relationships()
    rel = pair()
    key = str(rel["_key"])
    rels[key] = rel
    got = rels[key]
    got["products"] = "changed"
    assert rels[key]["products"] == "contoso app 1.0"
    rels[key] = got  # assigning it back stores it
    assert rels[key]["products"] == "changed"


def test_absorb_and_copy() -> None:
    a, b = Relationships(), Relationships()
    rel, other = pair(), mapped()
    b[str(rel["_key"])] = rel
    b[str(other["_key"])] = other
    c = b.copy()
    a.absorb(b)
    assert len(b) == 0 and len(a) == 2 and dict(a.items()) == dict(c.items())


def test_entries_are_the_stored_objects() -> None:
    """What the query graph's adjacency lists hold: the stored row or dict itself, the same
    object on every read, read without building it."""
    rels = Relationships(prints=False)
    rel, other = pair(), mapped()
    key, other_key = str(rel["_key"]), str(other["_key"])
    row = rels.put(key, rel)
    assert rels.entry(key) is row and rels.entry(other_key) is None
    assert rels.put(other_key, other) is other and rels.entry(other_key) is other
    assert entry_item(row) == rel and entry_item(other) is other
    assert entry_ends(row) == (MACHINE, CVE) and entry_class(row) == rel["_class"]
    assert entry_ends(other) == (None, None) and entry_class(other) == "IS"
    assert rels.rows([key]) == [(rel["_type"], b"", tuple(rel))]  # no print made
    copy = Relationships()
    for k, entry in rels.entries():
        copy.put_entry(k, entry)
    assert copy.entry(key) is row and copy.entry(other_key) is other


def test_scopes_other_than_the_default_are_kept() -> None:
    g = Graph()
    rel = pair()
    key = str(rel["_key"])
    g.add_relationship(rel, schema.SCOPE_VULNERABILITIES)  # the type's own scope
    g.add_relationship(mapped(), "elsewhere")
    assert default_scope(rel["_type"]) == schema.SCOPE_VULNERABILITIES
    assert g.scope_of.explicit == {mapped()["_key"]: "elsewhere"}
    assert g.scope_of[key] == schema.SCOPE_VULNERABILITIES
    assert dict(g.scope_of) == {key: schema.SCOPE_VULNERABILITIES, mapped()["_key"]: "elsewhere"}
    copied = Graph(relationships=g.relationships.copy(), scope_of=g.scope_of)
    assert dict(copied.scope_of) == dict(g.scope_of)


def test_a_relationship_json_cannot_hold_is_named_by_the_diff() -> None:
    g = Graph()
    rel = {**pair(), "count": 2**70}  # beyond orjson's 64-bit integers
    g.add_relationship(rel, schema.SCOPE_VULNERABILITIES)
    assert g.relationships[str(rel["_key"])] is rel  # kept as given, not as a row
    try:
        diff.compare(g, None, diff.ignored_fields(None))
    except ValueError as exc:
        assert str(rel["_key"]) in str(exc)
    else:
        raise AssertionError("the diff accepted an item JSON cannot hold")


def builder_for_tests() -> GraphBuilder:
    return GraphBuilder(
        TenantConfig(
            name="t",
            tenant_id="22222222-2222-2222-2222-222222222222",
            client_id="11111111-1111-1111-1111-111111111111",
            client_secret=SecretStr("not-a-real-secret"),
        )
    )


def machine_source(mid: str = "m1") -> dict[str, object]:
    return {"id": mid, "computerDnsName": "host1", "riskScore": "High", "vmMetadata": None}


def test_raw_data_is_held_as_the_json_the_snapshot_stores() -> None:
    source = machine_source()
    entity = schema.MACHINE.entity("m1", "host1", {"riskScore": "High"}, raw=source)
    raw = entity["_rawData"]
    assert isinstance(raw, RawData)
    plain = {**entity, "_rawData": [{"name": "default", "rawData": source}]}
    # the same canonical JSON, so the same print and the same stored body as the plain dicts
    assert canonical_print(entity) == canonical_print(plain)
    assert diff.fingerprint(entity, diff.ignored_fields(None)[schema.MACHINE.type]) == (
        diff.fingerprint(plain, diff.ignored_fields(None)[schema.MACHINE.type])
    )
    # it reads back as the list it stands for
    assert raw == plain["_rawData"] and raw[0]["rawData"] == source and len(raw) == 1
    assert raw != [{"name": "default", "rawData": {**source, "riskScore": "Low"}}]
    assert "bytes" in repr(raw) and "host1" not in repr(raw)


def test_export_and_query_results_carry_plain_raw_data() -> None:
    g = Graph()
    source = machine_source()
    g.add_entity(schema.MACHINE.entity("m1", "host1", {}, raw=source), schema.SCOPE_MACHINES)
    exported = g.export()["entities"][0]
    assert exported["_rawData"] == [{"name": "default", "rawData": source}]
    assert type(exported["_rawData"]) is list
    json.dumps(exported)  # other serialisers than orjson can write it
    assert type(public(g.entities[MACHINE], include_raw=True)["_rawData"]) is list
    assert "_rawData" not in public(g.entities[MACHINE])


def test_a_machine_and_its_device_hold_one_raw_data() -> None:
    builder = builder_for_tests()
    builder.add_machines([machine_source()])
    g = builder.graph()
    device = g.entities[schema.DEVICE.key("m1")]
    assert device["_rawData"] is g.entities[MACHINE]["_rawData"]


def test_raw_data_json_cannot_hold_rejects_the_item_by_name() -> None:
    builder = builder_for_tests()
    builder.add_machines([{**machine_source("m1"), "huge": 2**70}, machine_source("m2")])
    g = builder.graph()
    assert schema.MACHINE.key("m2") in g.entities and MACHINE not in g.entities
    (rejected,) = builder.rejected_in(schema.SCOPE_MACHINES)
    assert rejected.index == 0


def big_source(i: int) -> dict[str, object]:
    return {"id": f"m{i}", "note": "x" * 10_000}


def test_raw_data_is_not_held_in_memory() -> None:
    tracemalloc.start()
    try:
        raws = [RawData.default(big_source(i)) for i in range(200)]  # 2 MB of JSON
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 200_000  # their places, not their 2 MB
    # read back exactly, as the snapshot writes it
    assert [r[0]["rawData"] for r in raws] == [big_source(i) for i in range(200)]
    entity = {"_key": "k", "_rawData": raws[7]}
    assert orjson.loads(canonical_json(entity))["_rawData"][0]["rawData"] == big_source(7)
    # another process gets the JSON with it
    copy = pickle.loads(pickle.dumps(raws[3]))
    assert copy == raws[3] and copy.value == raws[3].value


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_spill_file_goes_with_the_last_raw_data_in_it() -> None:
    """In a process of its own: the file is shared by every RawData alive in the process."""
    code = (
        "import gc, os, tempfile\n"
        "from monitor.model.raw import RawData\n"
        "def spill_files():  # open unlinked temporary files\n"
        "    tmp, n = tempfile.gettempdir(), 0\n"
        "    for fd in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            target = os.readlink(f'/proc/self/fd/{fd}')\n"
        "        except OSError:\n"
        "            continue\n"
        "        n += target.startswith(tmp) and target.endswith(' (deleted)')\n"
        "    return n\n"
        "before = spill_files()\n"
        "raws = [RawData.default({'note': 'x' * 10000}) for _ in range(10)]\n"
        "during = spill_files()\n"
        "del raws\n"
        "gc.collect()\n"
        "print(during - before, spill_files() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"]  # one file while they live, none after


def test_raw_data_stays_in_memory_when_no_spill_file_can_be_made(tmp_path: Path) -> None:
    code = (
        "import sys, tempfile, tracemalloc\n"
        "tempfile.tempdir = sys.argv[1]  # a directory that is not there\n"
        "from monitor.model.raw import RawData, canonical_json\n"
        "tracemalloc.start()\n"
        "r = RawData.default({'note': 'x' * 10000})\n"
        "held = tracemalloc.get_traced_memory()[0]\n"
        "assert r.value == [{'name': 'default', 'rawData': {'note': 'x' * 10000}}]\n"
        "assert canonical_json({'_rawData': r}).count(b'x') == 10000\n"
        "print(repr(r), held >= 10000)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "gone")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["RawData(10042", "bytes)", "True"]  # its JSON in memory


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_spills_to_its_own_file() -> None:
    """A child appending to its parent's file at the parent's end would overwrite what the
    parent appends next (a Celery prefork worker forks after loading the app)."""
    first = RawData.default(big_source(1))
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: spill one, let the parent spill one, read both back
        try:
            mine = RawData.default(big_source(2))
            os.write(to_parent_w, b"1")
            os.read(to_child_r, 1)
            ok = mine[0]["rawData"] == big_source(2) and first[0]["rawData"] == big_source(1)
        finally:
            os._exit(0 if ok else 1)
    os.read(to_parent_r, 1)
    theirs = RawData.default(big_source(3))  # after the child's append
    os.write(to_child_w, b"1")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert theirs[0]["rawData"] == big_source(3) and first[0]["rawData"] == big_source(1)
