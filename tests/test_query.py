"""J1QL over real committed snapshots in Redis: the language, the result shapes, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from detect_helpers import (
    T0,
    TENANT,
    Tenant,
    build_graph,
    commit,
    machine_key,
    standard_tenant,
)
from typer.testing import CliRunner

from monitor.cli import app
from monitor.config import Settings
from monitor.query import QueryError, QuerySyntaxError, run_query
from monitor.query import executor as qexec
from monitor.query.graph import clear_cache
from monitor.snapshot.store import SnapshotStore

DAY = 86_400_000


def query_tenant() -> Tenant:
    """standard_tenant() with known facts (see the pairs in detect_helpers.standard_tenant)."""
    t = standard_tenant()
    t.machines["m01"]["riskScore"] = "High"
    t.machines["m02"].update(riskScore="Critical", healthStatus="Inactive")
    t.machines["m03"]["machineTags"] = ["corp", "vip"]
    t.machines["m04"]["lastSeenOn"] = T0 - 10 * DAY
    t.machines["m05"]["osPlatform"] = "Linux"
    t.machines["m09"]["tag.AccountName"] = "Contoso Ltd"  # as with tag_with_account_name
    t.vulns["CVE-2024-1000"].update(severity="Critical", publicExploit=True, score=9.8)
    t.vulns["CVE-2024-1001"]["score"] = 5.0
    t.logon_users["l0"]["isDomainAdmin"] = True
    t.users["u01"].update(accountEnabled=False, active=False)
    return t


@pytest.fixture
def settings(redis_client: redis.Redis, redis_url: str, redis_prefix: str) -> Settings:
    clear_cache()
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(query_tenant()), finished="2024-05-01T10:00:00.000Z")
    return Settings(redis_url=redis_url, redis_prefix=redis_prefix)


def q(client: redis.Redis, settings: Settings, text: str, **kw: Any) -> dict[str, Any]:
    return run_query(client, settings, text, **kw)


def keys(doc: dict[str, Any]) -> list[str]:
    return [e["_key"] for e in doc["data"]]


def names(doc: dict[str, Any]) -> list[str]:
    return sorted(e["displayName"] for e in doc["data"])


def host(i: int) -> str:
    return f"m{i:02d}.contoso.local"


def test_find_class_type_star_and_alternatives(
    redis_client: redis.Redis, settings: Settings
) -> None:
    doc = q(redis_client, settings, "FIND HostAgent")
    assert doc["type"] == "list" and doc["count"] == 10 and not doc["truncated"]
    item = doc["data"][0]
    assert {"_key", "_type", "_class", "displayName", "riskScore", "_tenant"} <= set(item)
    assert "_rawData" not in item
    raw = q(redis_client, settings, "FIND HostAgent", include_raw=True)
    assert "_rawData" in raw["data"][0]
    assert q(redis_client, settings, "find microsoft_defender_machine")["count"] == 10
    assert q(redis_client, settings, "FIND (Device|HostAgent)")["count"] == 20
    assert q(redis_client, settings, "FIND User")["count"] == 8 + 5  # users + logon users
    assert q(redis_client, settings, "FIND * WITH _type = 'microsoft_defender_user'")["count"] == 8
    assert q(redis_client, settings, "FIND hostagent")["count"] == 0  # values case-sensitive
    assert doc["tenants"] == {TENANT: 1}


def test_with_operators(redis_client: redis.Redis, settings: Settings) -> None:
    def n(text: str) -> list[str]:
        return names(q(redis_client, settings, text))

    assert n("FIND HostAgent WITH riskScore = 'High'") == [host(1)]
    assert n("FIND HostAgent WITH riskScore = ('High' OR 'Critical')") == [host(1), host(2)]
    assert len(n("FIND HostAgent WITH riskScore != ('High' OR 'Critical')")) == 8
    assert n("FIND HostAgent WITH riskScore != 'Low' AND healthStatus = 'Active'") == [host(1)]
    # AND binds tighter than OR; parentheses regroup
    assert n(
        "FIND HostAgent WITH riskScore = 'High' OR riskScore = 'Critical' AND osPlatform = 'Linux'"
    ) == [host(1)]
    assert n(
        "FIND HostAgent WITH (riskScore = 'High' OR riskScore = 'Critical') AND healthStatus = 'Inactive'"
    ) == [host(2)]
    assert n(
        "FIND HostAgent WITH computerDnsName ^= 'm0' AND computerDnsName $= '5.contoso.local'"
    ) == [host(5)]
    assert len(n("FIND HostAgent WITH computerDnsName ~= 'contoso'")) == 10
    assert len(n("FIND HostAgent WITH computerDnsName !~= 'm01'")) == 9
    assert len(n("FIND HostAgent WITH computerDnsName !^= 'm0'")) == 0
    assert len(n("FIND HostAgent WITH computerDnsName !$= '.local'")) == 0
    # list-valued properties match when any member does
    assert n("FIND HostAgent WITH machineTags = 'vip'") == [host(3)]
    assert len(n("FIND HostAgent WITH machineTags = 'corp'")) == 5
    assert n("FIND HostAgent WITH machineTags = ('corp' AND 'vip')") == [host(3)]
    assert len(n("FIND HostAgent WITH machineTags != 'corp'")) == 5
    # undefined: absent or null
    assert len(n("FIND HostAgent WITH riskScore = undefined")) == 0
    assert len(n("FIND HostAgent WITH isExcluded = undefined")) == 10
    assert len(n("FIND HostAgent WITH riskScore != undefined")) == 10
    # numbers, booleans
    assert names(q(redis_client, settings, "FIND Finding WITH score > 9")) == ["CVE-2024-1000"]
    assert names(q(redis_client, settings, "FIND Finding WITH score <= 5")) == ["CVE-2024-1001"]
    assert names(q(redis_client, settings, "FIND Finding WITH publicExploit = true")) == [
        "CVE-2024-1000"
    ]
    assert len(n("FIND Finding WITH publicExploit = 'true'")) == 0
    assert n("FIND HostAgent WITH tag.AccountName = 'Contoso Ltd'") == [host(9)]
    assert n("FIND HostAgent WITH [tag.AccountName] ^= 'Contoso'") == [host(9)]
    # quoted odd names, dates
    assert len(n("FIND HostAgent WITH [computerDnsName] ~= 'm0'")) == 10
    assert n(f"FIND HostAgent WITH lastSeenOn < date({T0 - DAY})") == [host(4)]
    assert n("FIND HostAgent WITH lastSeenOn < date(2023-11-10)") == [host(4)]
    assert len(n("FIND HostAgent WITH lastSeenOn > date.now - 7 days")) == 0  # T0 is 2023


def test_traversals(redis_client: redis.Redis, settings: Settings) -> None:
    crit = "FIND HostAgent THAT IDENTIFIED Finding WITH severity = 'Critical'"
    assert names(q(redis_client, settings, crit)) == [host(0), host(5), host(6)]
    assert names(q(redis_client, settings, crit.replace("IDENTIFIED", "IDENTIFIED >>"))) == [
        host(0),
        host(5),
        host(6),
    ]
    assert q(redis_client, settings, crit.replace("IDENTIFIED", "IDENTIFIED <<"))["count"] == 0
    back = "FIND Finding THAT IDENTIFIED << HostAgent WITH riskScore = 'Critical'"
    assert names(q(redis_client, settings, back)) == ["CVE-2024-1002", "CVE-2024-1003"]
    # negation: machines without any logon user
    none = names(q(redis_client, settings, "FIND HostAgent THAT !HAS User"))
    assert none == [host(i) for i in range(5, 10)]
    assert q(redis_client, settings, "FIND HostAgent THAT RELATES TO Account")["count"] == 10
    assert q(redis_client, settings, "FIND HostAgent THAT (HAS|MANAGES) Device")["count"] == 10
    # two hops, and the mapped relationship to the cve placeholder
    two = (
        "FIND User WITH isDomainAdmin = true THAT HAS HostAgent THAT IDENTIFIED Finding THAT IS cve"
    )
    assert names(q(redis_client, settings, two)) == ["l0"]
    cves = q(redis_client, settings, "FIND cve THAT IS Finding WITH severity = 'Critical'")
    assert keys(cves) == ["cve-2024-1000"]
    assert cves["data"][0]["_placeholder"] is True


def test_where_return_aggregates_order(redis_client: redis.Redis, settings: Settings) -> None:
    doc = q(
        redis_client,
        settings,
        "FIND HostAgent AS m THAT IDENTIFIED AS r Finding AS v "
        "WHERE v.severity = 'Critical' AND r.products ~= 'windows' "
        "RETURN m.displayName, v.id ORDER BY m.displayName",
    )
    assert doc["type"] == "table"
    assert doc["data"] == [{"m.displayName": host(i), "v.id": "CVE-2024-1000"} for i in (0, 5, 6)]
    counted = q(
        redis_client,
        settings,
        "FIND Finding AS v THAT IDENTIFIED HostAgent AS m "
        "RETURN v.displayName, COUNT(m) ORDER BY COUNT(m) DESC, v.displayName LIMIT 2",
    )
    assert counted["data"] == [
        {"v.displayName": "CVE-2024-1001", "COUNT(m)": 4},
        {"v.displayName": "CVE-2024-1002", "COUNT(m)": 4},
    ]
    stats = q(
        redis_client,
        settings,
        "FIND HostAgent AS m THAT IDENTIFIED Finding AS v "
        "RETURN MIN(v.score), MAX(v.score) AS top, AVG(v.score), SUM(v.score), count(v)",
    )
    assert stats["data"] == [
        {"MIN(v.score)": 5.0, "top": 9.8, "AVG(v.score)": 7.4, "SUM(v.score)": 14.8, "count(v)": 6}
    ]
    # comparison between two aliases' properties
    same = q(
        redis_client,
        settings,
        "FIND HostAgent AS m THAT MANAGES Device AS d WHERE m.displayName = d.displayName "
        "RETURN m.displayName ORDER BY m.displayName DESC SKIP 1 LIMIT 2",
    )
    assert [r["m.displayName"] for r in same["data"]] == [host(8), host(7)]
    star = q(redis_client, settings, "FIND HostAgent AS m WITH riskScore = 'High' RETURN m.*")
    assert star["data"][0]["m.riskScore"] == "High" and "m._rawData" not in star["data"][0]
    listed = q(redis_client, settings, "FIND HostAgent ORDER BY lastSeenOn LIMIT 1")
    assert names(listed) == [host(4)]
    grouped = q(
        redis_client,
        settings,
        "FIND HostAgent AS m RETURN m.riskScore, COUNT(m) ORDER BY m.riskScore",
    )
    assert grouped["data"] == [
        {"m.riskScore": "Critical", "COUNT(m)": 1},
        {"m.riskScore": "High", "COUNT(m)": 1},
        {"m.riskScore": "Low", "COUNT(m)": 8},
    ]
    tagged = q(redis_client, settings, "FIND HostAgent WITH _tenant = 'contoso' LIMIT 3")
    assert tagged["count"] == 3


def test_changed_since_and_begin_on(
    redis_client: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    clear_cache()
    store = SnapshotStore(redis_client, redis_prefix)
    t = query_tenant()
    commit(store, build_graph(t), finished="2024-05-01T10:00:00.000Z")
    t.machines["m07"]["riskScore"] = "High"
    commit(store, build_graph(t), finished="2024-05-02T10:00:00.000Z")
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix)
    changed = q(
        redis_client,
        settings,
        "FIND HostAgent WITH CHANGED riskScore SINCE date(2024-05-02)",
    )
    assert names(changed) == [host(7)]
    assert (
        q(redis_client, settings, "FIND HostAgent WITH CHANGED osPlatform SINCE date(2024-05-02)")[
            "count"
        ]
        == 0
    )
    begun = q(
        redis_client,
        settings,
        "FIND HostAgent AS m WITH _beginOn >= date(2024-05-02) RETURN m.displayName, m._createdOn",
    )
    assert begun["data"] == [{"m.displayName": host(7), "m._createdOn": 1714557600000}]


def test_errors(redis_client: redis.Redis, settings: Settings) -> None:
    with pytest.raises(QuerySyntaxError) as err:
        q(redis_client, settings, "FIND HostAgent\n  WITH riskScore = 'High' AND")
    assert (err.value.line, err.value.column) == (2, 30)
    assert "expected a property name" in err.value.message
    with pytest.raises(QuerySyntaxError) as err:
        q(redis_client, settings, "FIND HostAgent WITH riskScore == 'x'")
    assert err.value.column == 32
    with pytest.raises(QueryError) as err:
        q(redis_client, settings, "FIND HostAgent AS m WHERE x.riskScore = 'High'")
    assert "unknown alias 'x'" in err.value.message and err.value.column == 27
    with pytest.raises(QueryError) as err:
        q(redis_client, settings, "FIND HostAgent WITH lastSeenOn > '2024-01-01'")
    assert "is a date" in err.value.message
    with pytest.raises(QueryError) as err:
        q(redis_client, settings, "FIND HostAgent WITH displayName > date.now - 1 day")
    assert "not a date property" in err.value.message
    with pytest.raises(QueryError):
        q(redis_client, settings, "FIND HostAgent AS m RETURN z.name")
    for text, column in (  # the source object rides with an entity, it is not a property
        ("FIND HostAgent WITH _rawData.default.id = 'x'", 21),
        ("FIND HostAgent AS m WHERE m._rawData = 'x'", 27),
        ("FIND HostAgent AS m RETURN m._rawData", 28),
        ("FIND HostAgent AS m RETURN m.id ORDER BY m._rawData", 42),
    ):
        with pytest.raises(QueryError) as err:
            q(redis_client, settings, text)
        assert "_rawData is not a queryable property" in err.value.message, text
        assert err.value.column == column, text


def test_star_refusal_and_traversal_cap(
    redis_client: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qexec, "STAR_SCAN_LIMIT", 10)
    with pytest.raises(QueryError) as err:
        q(redis_client, settings, "FIND *")
    assert "LIMIT" in err.value.message and err.value.column == 6
    assert q(redis_client, settings, "FIND * LIMIT 5")["count"] == 5
    capped = q(redis_client, settings, "FIND HostAgent", limit=4)
    assert capped["count"] == 4 and capped["truncated"] is True
    monkeypatch.setattr(qexec, "DEFAULT_MAX_PATHS", 7)
    doc = q(
        redis_client,
        settings,
        "FIND HostAgent AS m THAT IDENTIFIED Finding AS v RETURN m.displayName, v.id",
    )
    assert doc["count"] == 7 and doc["truncated"] is True and "traversal" in doc["message"]


def test_every_tenant_when_none_is_named(
    redis_client: redis.Redis, settings: Settings, redis_prefix: str
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant(machines=3)), tenant="fabrikam")
    doc = q(redis_client, settings, "FIND HostAgent AS m RETURN m._tenant, COUNT(m)")
    assert doc["data"] == [
        {"m._tenant": "contoso", "COUNT(m)": 10},
        {"m._tenant": "fabrikam", "COUNT(m)": 3},
    ]
    assert q(redis_client, settings, "FIND HostAgent", tenant="fabrikam")["count"] == 3
    with pytest.raises(QueryError, match="unknown tenant"):
        q(redis_client, settings, "FIND HostAgent", tenant="nope")


@pytest.fixture
def config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(f"redis_url: {settings.redis_url}\nredis_prefix: {settings.redis_prefix}\n")
    return path


def test_cli_query(config: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["--config", str(config), "query", "--json", "FIND HostAgent WITH riskScore = 'High'"]
    )
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.stdout)
    assert doc["type"] == "list" and [e["_key"] for e in doc["data"]] == [machine_key("m01")]
    res = runner.invoke(
        app, ["--config", str(config), "query", "FIND HostAgent WITH riskScore = 'Nope'"]
    )
    assert res.exit_code == 0
    res = runner.invoke(
        app,
        [
            "--config",
            str(config),
            "query",
            "--format",
            "csv",
            "FIND HostAgent AS m RETURN m.displayName, m.riskScore ORDER BY m.displayName LIMIT 2",
        ],
    )
    assert res.exit_code == 0
    assert res.stdout.splitlines()[:2] == ["m.displayName,m.riskScore", f"{host(0)},Low"]
    res = runner.invoke(app, ["--config", str(config), "query", "FIND HostAgent WITH"])
    assert res.exit_code == 2
    assert "line 1, column 20" in res.stderr and "^" in res.stderr


def test_a_relationship_is_used_once_per_path(
    redis_client: redis.Redis, settings: Settings
) -> None:
    # logon user l1 is on m00 and m01; l0, l2, l3, l4 each on one machine only
    shared = q(redis_client, settings, "FIND HostAgent THAT HAS User THAT HAS HostAgent")
    assert names(shared) == [host(0), host(1)]
    rows = q(
        redis_client,
        settings,
        "FIND HostAgent AS a THAT HAS User AS u THAT HAS HostAgent AS b "
        "RETURN a.displayName, u.displayName, b.displayName ORDER BY a.displayName",
    )
    assert rows["data"] == [
        {"a.displayName": host(0), "u.displayName": "l1", "b.displayName": host(1)},
        {"a.displayName": host(1), "u.displayName": "l1", "b.displayName": host(0)},
    ]


def test_relative_dates_are_known_however_written() -> None:
    """Query rules plan a query again when its dates move with the clock; the parser says so
    (a text search for "date.now" missed `date . now` and a line break)."""
    from monitor.query import compile_query

    assert compile_query("FIND HostAgent WITH lastSeenOn > date . now - 7 days").query.relative
    assert compile_query("FIND HostAgent WITH lastSeenOn >\n  date.\nNOW").query.relative
    assert not compile_query("FIND HostAgent WITH lastSeenOn > date(2024-05-01)").query.relative
