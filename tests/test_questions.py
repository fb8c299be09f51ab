"""Every shipped question runs against a generated tenant; a plain-Python oracle over the same
committed graph gives the known answer."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from query_helpers import TENANT, Generated, generated_tenant
from typer.testing import CliRunner

from monitor.cli import app
from monitor.config import Settings
from monitor.model import schema
from monitor.model.graph import Item
from monitor.query import run_query
from monitor.query.graph import clear_cache
from monitor.questions import load_questions
from monitor.redis_conn import delete_prefix
from monitor.snapshot.store import SnapshotStore

DAY = 86_400_000


@pytest.fixture(scope="module")
def world(redis_url: str) -> Iterator[tuple[redis.Redis, Settings, Generated]]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"mdetest-questions-{uuid.uuid4().hex[:8]}"
    clear_cache()
    gen = generated_tenant(SnapshotStore(client, prefix))
    yield client, Settings(redis_url=redis_url, redis_prefix=prefix), gen
    delete_prefix(client, prefix)


class Oracle:
    """The same facts read straight from the graph's dicts."""

    def __init__(self, gen: Generated) -> None:
        g = gen.graph
        self.gen = gen
        self.now = int(time.time() * 1000)
        ents = list(g.entities.values())
        self.by_key = g.entities
        self.machines = [e for e in ents if e["_type"] == schema.MACHINE.type]
        self.users = [e for e in ents if e["_type"] == schema.USER.type]
        self.logons = [e for e in ents if e["_type"] == schema.LOGON_USER.type]
        self.vulns = [e for e in ents if e["_type"] == schema.VULNERABILITY.type]
        rels = list(g.relationships.values())
        self.pairs = [r for r in rels if r["_type"] == schema.MACHINE_IDENTIFIED_VULNERABILITY.type]
        self.has_logon = [r for r in rels if r["_type"] == schema.MACHINE_HAS_LOGON_USER.type]
        self.logon_is_user = [r for r in rels if r["_type"] == schema.LOGON_USER_IS_USER.type]

    def keys(self, items: list[Item]) -> set[str]:
        return {e["_key"] for e in items}

    def m_with(self, pred: Callable[[Item], bool]) -> set[str]:
        return self.keys([m for m in self.machines if pred(m)])

    def vulns_of(self, mkey: str) -> list[Item]:
        return [self.by_key[r["_toEntityKey"]] for r in self.pairs if r["_fromEntityKey"] == mkey]

    def machines_of(self, vkey: str) -> list[Item]:
        return [self.by_key[r["_fromEntityKey"]] for r in self.pairs if r["_toEntityKey"] == vkey]


def _strings(value: Any) -> list[str]:
    """A property that is a string or a list of strings, as a list (for `~=` oracles)."""
    if isinstance(value, str):
        return [value]
    return [v for v in value or [] if isinstance(v, str)]


def top(rows: list[dict[str, Any]], count_key: str, name_key: str, n: int = 10) -> list[Any]:
    return sorted(rows, key=lambda r: (-r[count_key], r[name_key]))[:n]


def answers(o: Oracle) -> dict[str, dict[str, Any]]:
    """question id -> query name -> expected (a set of _keys, or the table rows)."""
    win = ("Windows10", "Windows11")
    crit_expl = o.keys(
        [
            v
            for v in o.vulns
            if v.get("severity") == "Critical"
            and (v.get("exploitVerified") is True or v.get("public") is True)
        ]
    )
    av_groups = Counter(
        m.get("rbacGroupName") for m in o.machines if m.get("defenderAvStatus") == "NotUpdated"
    )
    cve_rows = [
        {"v.displayName": v["displayName"], "v.severity": v.get("severity"), "COUNT(m)": n}
        for v in o.vulns
        if (n := len(o.machines_of(v["_key"])))
    ]
    m_rows = [
        {"m.displayName": m["displayName"], "COUNT(v)": n}
        for m in o.machines
        if (n := len(o.vulns_of(m["_key"])))
    ]
    admins = {u["_key"]: u for u in o.logons if u.get("isDomainAdmin") is True}
    disabled = [u for u in o.users if u.get("active") is False]
    logon_counts = Counter(r["_toEntityKey"] for r in o.has_logon)
    sev_rows: dict[str, list[float]] = {}
    present = [v for v in o.vulns if o.machines_of(v["_key"])]
    for v in present:
        sev_rows.setdefault(v.get("severity"), []).append(v.get("score"))
    return {
        "mde-machines-inactive-or-impaired": {
            "machines": o.m_with(lambda m: m.get("healthStatus") != "Active")
        },
        "mde-machines-not-seen-7-days": {
            "machines": o.m_with(lambda m: (m.get("lastSeenOn") or o.now) < o.now - 7 * DAY)
        },
        "mde-machines-without-logon-user": {
            "machines": o.m_with(
                lambda m: not any(r["_fromEntityKey"] == m["_key"] for r in o.has_logon)
            )
        },
        "mde-av-signatures-out-of-date-by-rbac-group": {
            "groups": sorted(
                ({"m.rbacGroupName": g, "COUNT(m)": n} for g, n in av_groups.items()),
                key=lambda r: (r["m.rbacGroupName"] is None, r["m.rbacGroupName"] or ""),
            )
        },
        "mde-av-disabled": {
            "machines": o.m_with(lambda m: m.get("defenderAvStatus") == "Disabled")
        },
        "mde-machines-high-risk": {
            "machines": o.m_with(lambda m: m.get("riskScore") in ("High", "Critical"))
        },
        "mde-machines-high-exposure": {
            "machines": o.m_with(lambda m: m.get("exposureLevel") == "High")
        },
        "mde-machines-not-onboarded": {
            "machines": o.m_with(lambda m: m.get("onboardingStatus") != "Onboarded")
        },
        "mde-windows-clients-not-aad-joined": {
            "machines": o.m_with(
                lambda m: m.get("osPlatform") in win and m.get("isAadJoined") is not True
            )
        },
        "mde-machines-by-os": {
            "platforms": top(
                [
                    {"m.osPlatform": p, "COUNT(m)": n}
                    for p, n in Counter(m.get("osPlatform") for m in o.machines).items()
                ],
                "COUNT(m)",
                "m.osPlatform",
                100,
            )
        },
        "mde-machines-by-risk": {
            "levels": sorted(
                (
                    {"m.riskScore": p, "COUNT(m)": n}
                    for p, n in Counter(m.get("riskScore") for m in o.machines).items()
                ),
                key=lambda r: r["m.riskScore"],
            )
        },
        "mde-vip-machines": {
            "machines": sorted(
                (
                    {
                        "m.displayName": m["displayName"],
                        "m.riskScore": m.get("riskScore"),
                        "m.exposureLevel": m.get("exposureLevel"),
                    }
                    for m in o.machines
                    if "VIP" in (m.get("machineTags") or [])
                ),
                key=lambda r: r["m.displayName"],
            )
        },
        "mde-servers-inactive": {
            "machines": o.m_with(
                lambda m: (
                    str(m.get("osPlatform")).startswith("WindowsServer")
                    and m.get("healthStatus") == "Inactive"
                )
            )
        },
        "mde-machines-exploitable-critical-cves": {
            "machines": o.m_with(
                lambda m: any(v["_key"] in crit_expl for v in o.vulns_of(m["_key"]))
            )
        },
        "mde-cves-on-most-machines": {"cves": top(cve_rows, "COUNT(m)", "v.displayName")},
        "mde-machines-most-cves": {"machines": top(m_rows, "COUNT(v)", "m.displayName")},
        "mde-cves-in-exploit-kits": {
            "cves": o.keys([v for v in present if v.get("exploitInKit") is True])
        },
        "mde-critical-cve-count": {
            "count": [{"COUNT(v)": sum(1 for v in o.vulns if v.get("severity") == "Critical")}]
        },
        "mde-vip-machines-high-cves": {
            "pairs": sorted(
                (
                    {"m.displayName": m["displayName"], "v.displayName": v["displayName"]}
                    for m in o.machines
                    if "VIP" in (m.get("machineTags") or [])
                    for v in o.vulns_of(m["_key"])
                    if v.get("severity") in ("High", "Critical")
                ),
                key=lambda r: (r["m.displayName"], r["v.displayName"]),
            )
        },
        "mde-openssl-vulnerable-machines": {
            "pairs": sorted(
                (
                    {
                        "m.displayName": o.by_key[r["_fromEntityKey"]]["displayName"],
                        "v.displayName": o.by_key[r["_toEntityKey"]]["displayName"],
                    }
                    for r in o.pairs
                    if any("openssl" in p for p in _strings(r.get("products")))
                ),
                key=lambda r: (r["m.displayName"], r["v.displayName"]),
            )
        },
        "mde-inactive-machines-critical-cves": {
            "machines": o.m_with(
                lambda m: (
                    m.get("healthStatus") != "Active"
                    and any(v.get("severity") == "Critical" for v in o.vulns_of(m["_key"]))
                )
            )
        },
        "mde-critical-cve-records": {
            "cves": {
                v["id"].lower()
                for v in o.vulns
                if v.get("severity") == "Critical" and v["id"].startswith("CVE-")
            }
        },
        "mde-high-score-cves-by-severity": {
            "scores": [
                {
                    "v.severity": s,
                    "MIN(v.score)": min(x for x in scores if x is not None),
                    "MAX(v.score)": max(x for x in scores if x is not None),
                    "COUNT(v)": len(scores),
                }
                for s, scores in sorted(sev_rows.items())
            ]
        },
        "mde-domain-admins-on-workstations": {
            "logons": sorted(
                (
                    {
                        "u.displayName": admins[r["_toEntityKey"]]["displayName"],
                        "m.displayName": o.by_key[r["_fromEntityKey"]]["displayName"],
                    }
                    for r in o.has_logon
                    if r["_toEntityKey"] in admins
                    and o.by_key[r["_fromEntityKey"]].get("osPlatform") in win
                ),
                key=lambda r: (r["u.displayName"], r["m.displayName"]),
            )
        },
        "mde-domain-admin-accounts": {"accounts": set(admins)},
        "mde-disabled-users-still-logging-on": {
            "users": sorted(
                (
                    {
                        "u.displayName": o.by_key[r["_toEntityKey"]]["displayName"],
                        "l.displayName": o.by_key[r["_fromEntityKey"]]["displayName"],
                        "m.displayName": o.by_key[h["_fromEntityKey"]]["displayName"],
                    }
                    for r in o.logon_is_user
                    if o.by_key[r["_toEntityKey"]].get("active") is False
                    for h in o.has_logon
                    if h["_toEntityKey"] == r["_fromEntityKey"]
                ),
                key=lambda r: (r["u.displayName"], r["l.displayName"], r["m.displayName"]),
            )
        },
        "mde-logon-accounts-not-in-directory": {
            "accounts": o.keys([u for u in o.logons if u.get("directoryUserState") == "not_found"])
        },
        "mde-disabled-users": {"users": o.keys(disabled)},
        "mde-guest-users": {"users": o.keys([u for u in o.users if u.get("userType") == "Guest"])},
        "mde-logon-users-on-most-machines": {
            "accounts": top(
                [
                    {"u.displayName": o.by_key[k]["displayName"], "COUNT(m)": n}
                    for k, n in logon_counts.items()
                ],
                "COUNT(m)",
                "u.displayName",
            )
        },
        "mde-risk-changed-24h": {"machines": o.gen.risk_changed},
        "mde-new-machines-7-days": {"machines": o.gen.new_machines},
    }


QUESTIONS = load_questions()


def test_library_is_complete() -> None:
    assert len(QUESTIONS) >= 25
    for q in QUESTIONS:
        assert q.title and q.description and q.tags and q.queries, q.id


@pytest.mark.parametrize("question", QUESTIONS, ids=[q.id for q in QUESTIONS])
def test_question_known_answer(
    question: Any, world: tuple[redis.Redis, Settings, Generated]
) -> None:
    client, settings, gen = world
    expected = answers(Oracle(gen))[question.id]
    for q in question.queries:
        doc = run_query(client, settings, q.query, TENANT)
        assert not doc["truncated"], doc.get("message")
        want = expected[q.name]
        if isinstance(want, set):
            assert doc["type"] == "list"
            assert {e["_key"] for e in doc["data"]} == want, q.query
        else:
            assert doc["type"] == "table"
            assert doc["data"] == want, q.query
        if question.id not in (
            "mde-servers-inactive",
            "mde-av-disabled",
            "mde-logon-accounts-not-in-directory",
        ):
            assert doc["data"], f"{question.id}: the generated tenant should give an answer"


def test_cli_questions(world: tuple[redis.Redis, Settings, Generated], tmp_path: Path) -> None:
    _client, settings, gen = world
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {settings.redis_url}\nredis_prefix: {settings.redis_prefix}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(config), "questions", "list", "--json"])
    assert res.exit_code == 0
    assert len(orjson.loads(res.stdout)) == len(QUESTIONS)
    res = runner.invoke(
        app, ["--config", str(config), "questions", "run", "risk-changed-24h", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.stdout)
    assert {e["_key"] for e in doc["results"]["machines"]["data"]} == gen.risk_changed
    res = runner.invoke(app, ["--config", str(config), "questions", "run", "nope"])
    assert res.exit_code == 2
