"""The export of a generated and of the recorded tenant, collected over the simulator (real
HTTPS), passes JupiterOne's own schema checks: `@jupiterone/data-model` 0.54.0 class schemas
through the rules of `toMatchGraphObjectSchema` / `toMatchDirectRelationshipSchema`
(tests/jupiterone_schema.py). What the newest release (0.64.2) would still reject is reported,
never failed (see docs/jupiterone-schemas.md for why)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupiterone_schema import NEWEST, PINNED, DataModel, summarize, validate_export

from monitor.collect.collector import collect_tenant
from monitor.config import parse_settings
from monitor.simulator import Simulator, generate_tenant, load_recorded_tenant

Export = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Export]:
    generated = generate_tenant(
        machines=40, users=30, vulns_per_machine=4, cves=60, logon_users_per_machine=2, seed=8
    )
    recorded = load_recorded_tenant("recorded")
    for machine_id in list(recorded.machines)[:3]:  # the recording has no logon users
        recorded.add_logon_user(machine_id)
    state = tmp_path_factory.mktemp("sim")
    with Simulator(tenants=[generated, recorded], state_dir=Path(state)) as sim:
        data = yaml.safe_load(sim.config_yaml())
        for t in data["tenants"]:
            t["tag_with_account_name"] = True
        settings = parse_settings(data, "test")
        out: dict[str, Export] = {}
        for tenant in settings.tenants:
            graph = collect_tenant(settings, tenant).graph
            assert graph is not None
            out["recorded" if tenant.name == "recorded" else "generated"] = graph.export()
    return out


@pytest.fixture(scope="module")
def pinned() -> DataModel:
    return DataModel(PINNED)


@pytest.mark.parametrize("tenant", ["generated", "recorded"])
def test_export_passes_the_pinned_schemas(
    exports: dict[str, Export], pinned: DataModel, tenant: str
) -> None:
    export = exports[tenant]
    types = {e["_type"] for e in export["entities"]}
    assert types >= {
        "microsoft_defender_account",
        "microsoft_defender_user",
        "microsoft_defender_machine",
        "user_endpoint",
        "microsoft_defender_vulnerability",
        "microsoft_defender_logon_user",
    }
    assert export["relationships"] and export["mappedRelationships"]
    rejected = validate_export(pinned, export)
    assert not rejected, json.dumps(summarize(rejected), indent=1)


def _first(export: Export, typ: str, kind: str = "entities") -> dict[str, Any]:
    return copy.deepcopy(next(i for i in export[kind] if i["_type"] == typ))


def test_the_checks_reject_what_jupiterone_rejects(
    exports: dict[str, Export], pinned: DataModel
) -> None:
    """The shapes this export used to have are rejected (so a pass above means something)."""
    export = exports["recorded"]
    user = _first(export, "microsoft_defender_user")
    user["createdOn"] = None  # null where a number is wanted
    device = _first(export, "user_endpoint")
    device.pop("make")  # a required (nullable) Device field left out
    identified = _first(
        export, "microsoft_defender_machine_identified_vulnerability", "relationships"
    )
    identified["products"] = ["ubuntu curl 7.58.0"]  # relationships take scalars only
    mapped = _first(export, "microsoft_defender_vulnerability_is_cve", "mappedRelationships")
    mapped["_mapping"]["targetEntity"]["_class"] = ["Vulnerability"]  # without its required fields
    twice = _first(export, "microsoft_defender_machine")
    bad: Export = {
        "entities": [user, device, twice, copy.deepcopy(twice)],
        "relationships": [identified],
        "mappedRelationships": [mapped],
    }
    reasons = summarize(validate_export(pinned, bad))
    assert reasons["entity microsoft_defender_user"] == {'/createdOn: must match type "number"': 1}
    assert "/: 'make' is a required property" in reasons["entity user_endpoint"]
    assert any(r.startswith("/products:") for r in reasons[f"relationship {identified['_type']}"])
    assert "/: 'blocking' is a required property" in reasons["mapped target cve"]
    assert f"duplicate _key {twice['_type']}" in reasons
    # and the newest release wants the account's vendor, which the account carries
    account = _first(export, "microsoft_defender_account")
    newest = DataModel(NEWEST)
    assert not validate_export(
        newest, {"entities": [account], "relationships": [], "mappedRelationships": []}
    )
    account.pop("vendor")
    only = {"entities": [account], "relationships": [], "mappedRelationships": []}
    assert summarize(validate_export(newest, only)) == {
        "entity microsoft_defender_account": {"/: 'vendor' is a required property": 1}
    }


def test_report_what_the_newest_release_would_reject(exports: dict[str, Export]) -> None:
    """Reported, not failed: 0.64.2 makes User/Device fields arrays or required that 0.54.0
    wants as strings, or that Defender does not give (docs/jupiterone-schemas.md)."""
    newest = DataModel(NEWEST)
    lines = [f"@jupiterone/data-model {NEWEST} would reject (reported, not failed):"]
    for name, export in sorted(exports.items()):
        rejected = validate_export(newest, export)
        total = len(export["entities"]) + len(export["relationships"])
        lines.append(f"  {name}: {len(rejected)} of {total} items")
        for typ, reasons in summarize(rejected).items():
            lines.append(f"    {typ}:")
            lines += [f"      {n:4d} x {reason[:150]}" for reason, n in reasons.items()]
    print("\n".join(lines))  # shown with `pytest -s` or in the report of a failing run
