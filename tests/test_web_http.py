"""The console over HTTP (Starlette's TestClient against the real app and real Redis): pages and
their JSON twins, auth (local, tokens, sessions, roles), CSRF, escaping, security headers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from conftest import RUN_ID
from detect_helpers import TENANT
from starlette.testclient import TestClient
from web_helpers import (
    CHANNEL_NAME,
    OPERATOR_TOKEN,
    SCRIPT_NAME,
    VIEWER_TOKEN,
    Served,
    populate,
    settings_for,
    write_alerts,
)

from monitor.alerts.silences import SilenceStore
from monitor.model.schema import MACHINE
from monitor.query import run_query
from monitor.redis_conn import delete_prefix
from monitor.web import create_app
from monitor.web.app import config_doc

M00 = MACHINE.key("m00")


@pytest.fixture(scope="module")
def world(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    prefix = f"mdetest-{RUN_ID}-web"
    client = redis.Redis.from_url(redis_url)
    alerts = write_alerts(tmp_path_factory.mktemp("alerts"))
    settings = settings_for(redis_url, prefix, alerts)
    populate(client, settings)
    yield {"client": client, "prefix": prefix, "alerts": alerts, "redis_url": redis_url}
    delete_prefix(client, prefix)


@pytest.fixture(scope="module")
def local(world: dict) -> TestClient:
    """The console bound to loopback with no sign-in configured: everyone local is operator."""
    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    return TestClient(create_app(s, host="127.0.0.1"), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def secured(world: dict) -> TestClient:
    s = settings_for(world["redis_url"], world["prefix"], world["alerts"], tokens=True)
    return TestClient(create_app(s, host="0.0.0.0"), base_url="https://console.example")


def csrf_of(html: str) -> str:
    m = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', html)
    assert m, "page carries a CSRF token"
    return m.group(1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------- pages + JSON


def test_pages_render_with_security_headers(local: TestClient) -> None:
    for path in ("/", f"/tenants/{TENANT}", "/changes", "/explore", "/alerts", "/audit"):
        r = local.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        # no inline script or style anywhere: the CSP would block it
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), path
        assert "style=" not in r.text and "<style" not in r.text, path


def test_overview_json_has_status_health_and_plots(local: TestClient) -> None:
    doc = local.get("/api/overview").json()
    (t,) = doc["status"]["tenants"]
    assert t["name"] == TENANT and t["health"] == "ok"
    assert t["last_completed_sync"]["counts"]["microsoft_defender_machine"] == 10
    assert doc["firing_total"] >= 2 and doc["dead_letters"] >= 1
    html = local.get("/").text
    assert "machines by risk score" in html and "<svg" in html
    tdoc = local.get(f"/api/tenants/{TENANT}").json()
    agg = tdoc["history"][0]["aggregates"]
    assert agg["machines"]["riskScore"]["High"] == 2
    assert local.get("/api/status").json()["tenants"][0]["name"] == TENANT
    assert local.get("/api/tenants/nope").status_code == 404


def test_changes_filters_and_cursor_paging(local: TestClient) -> None:
    doc = local.get("/api/changes", params={"type": "mde.machine.risk_raised"}).json()
    subjects = {r["subject"] for r in doc["events"]}
    assert subjects == {M00, MACHINE.key("m01")}
    assert doc["next"] is None
    by_field = local.get("/api/changes", params={"field": "exposureLevel"}).json()
    assert {r["subject"] for r in by_field["events"]} == {MACHINE.key("m02")}
    by_text = local.get("/api/changes", params={"q": "CHANNEL"}).json()
    assert by_text["events"] and all(r["subject"] == MACHINE.key("m01") for r in by_text["events"])
    # cursor paging: one row per page walks the whole timeline without repeats
    seen, before = [], None
    while True:
        params = {"limit": 1, **({"before": before} if before else {})}
        page = local.get("/api/changes", params=params).json()
        seen += [r["id"] for r in page["events"]]
        before = page["next"]
        if not before:
            break
    everything = local.get("/api/changes", params={"limit": 500}).json()["events"]
    assert seen == [r["id"] for r in everything] and len(seen) == len(set(seen)) > 3


def test_entity_page_history_relationships_graph_and_portal(local: TestClient) -> None:
    doc = local.get(f"/api/entities/{quote(M00, safe='')}").json()
    assert doc["tenant"] == TENANT and doc["entity"]["riskScore"] == "High"
    assert any(
        h["field"] == "riskScore" and h["old"] == "Low" and h["new"] == "High"
        for h in doc["field_history"]
    )
    classes = {r["class"] for r in doc["relationships"]}
    assert {"IDENTIFIED", "HAS"} <= classes
    assert doc["portal"][0]["url"].startswith("https://security.microsoft.com/machines/")
    g = local.get("/api/graph", params={"key": M00}).json()
    ids = {n["data"]["id"] for n in g["nodes"]}
    assert M00 in ids and any(i.startswith("microsoft_defender_vulnerability:") for i in ids)
    assert all(e["data"]["source"] in ids and e["data"]["target"] in ids for e in g["edges"])
    assert local.get("/api/entities/nope%3Anothing").status_code == 404
    assert local.get("/api/graph", params={"key": "nope"}).status_code == 404


def test_microsoft_strings_render_as_text(local: TestClient) -> None:
    for path in (
        "/changes",
        f"/entities/{quote(M00, safe='')}",
        f"/entities/{quote(MACHINE.key('m01'), safe='')}",
        "/explore?q=FIND+microsoft_defender_machine",
    ):
        html = local.get(path).text
        assert "<script>alert(1)</script>" not in html, path
        assert "<!channel>" not in html, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in local.get("/changes").text
    assert "&lt;!channel&gt;" in local.get("/changes").text
    # the JSON twin carries the raw value (JSON is not HTML)
    names = {r["name"] for r in local.get("/api/changes").json()["events"]}
    assert SCRIPT_NAME in names and CHANNEL_NAME in names


def test_query_api_is_the_query_json_document(local: TestClient, world: dict) -> None:
    q = "FIND microsoft_defender_machine WITH riskScore = 'High'"
    r = local.get("/api/query", params={"q": q, "tenant": TENANT})
    assert r.status_code == 200
    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    expected = run_query(world["client"], s, q, TENANT)
    assert r.json() == json.loads(json.dumps(expected, default=str))
    assert r.json()["type"] in ("list", "table")
    assert {row["_key"] for row in r.json()["data"]} == {M00, MACHINE.key("m01")}
    bad = local.get("/api/query", params={"q": "FIND"})
    assert bad.status_code == 400 and "line" in bad.json()["error"]
    csv_text = local.get("/explore.csv", params={"q": q}).text
    assert csv_text.splitlines()[0].startswith("_key") or "_key" in csv_text.splitlines()[0]


def test_alert_json_endpoints(local: TestClient) -> None:
    alerts = local.get("/api/alerts").json()
    assert [r["name"] for r in alerts["rules"]] == ["machine-risk-raised"]
    firing = alerts["firing"]["machine-risk-raised"]
    assert {f["subject"] for f in firing} == {M00, MACHINE.key("m01")}
    deliveries = local.get("/api/deliveries").json()["deliveries"]
    assert {d["sink"] for d in deliveries} == {"file", "hook"}
    dead = local.get("/api/dead-letters").json()
    assert dead and dead[0]["sink"] == "hook"
    one = local.get(f"/api/deliveries/{dead[0]['delivery']}").json()
    assert one["delivery"]["status"] == "dead" and one["attempts"]
    sinks = {s["name"]: s for s in local.get("/api/sinks").json()}
    assert sinks["hook"]["type"] == "webhook" and "whsec_" not in json.dumps(sinks)
    assert isinstance(local.get("/api/silences").json(), list)
    assert local.get("/api/me").json()["role"] == "operator"
    page = local.get("/alerts").text
    assert "whsec_" not in page


# ---------------------------------------------------------------------------- CSRF + actions


def test_operator_actions_need_csrf_and_are_audited(local: TestClient, world: dict) -> None:
    page = local.get("/alerts")
    token = csrf_of(page.text)
    form = {"matchers": f"subject={M00}", "duration": "8h", "comment": "rebuild"}
    # no token, a wrong token, a foreign origin: refused, nothing created
    assert local.post("/alerts/silences", data=form).status_code == 403
    assert local.post("/alerts/silences", data={**form, "csrf": "0" * 64}).status_code == 403
    evil = local.post(
        "/alerts/silences", data={**form, "csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403
    store = SilenceStore(world["client"], world["prefix"])
    assert not [s for s in store.all() if s.comment == "rebuild"]
    ok = local.post(
        "/alerts/silences",
        data={**form, "csrf": token},
        headers={"Origin": "http://127.0.0.1"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    (s,) = [s for s in store.all() if s.comment == "rebuild"]
    assert s.matchers == [f"subject={M00}"] and s.created_by == "local"
    # expire it through the JSON API with the header form of the token
    r = local.post(
        f"/api/silences/{s.id}/expire",
        headers={"X-CSRF-Token": token, "Origin": "http://127.0.0.1"},
    )
    assert r.status_code == 200 and r.json()["active"] is False
    audit = local.get("/api/audit").json()
    actions = [(a["action"], a["target"]) for a in audit]
    assert ("silence.expire", s.id) in actions and ("silence.create", s.id) in actions


def test_retry_dead_letter_queues_it_again(local: TestClient) -> None:
    token = csrf_of(local.get("/alerts").text)
    did = local.get("/api/dead-letters").json()[0]["delivery"]
    r = local.post(
        f"/api/deliveries/{did}/retry",
        headers={"X-CSRF-Token": token, "Origin": "http://127.0.0.1"},
    )
    assert r.status_code == 200 and r.json() == {"requeued": [did]}
    assert local.get(f"/api/deliveries/{did}").json()["delivery"]["status"] == "queued"
    missing = local.post(
        "/api/deliveries/nope/retry", headers={"X-CSRF-Token": token, "Origin": "http://127.0.0.1"}
    )
    assert missing.status_code == 404


# ---------------------------------------------------------------------------- authentication


def test_off_loopback_everything_needs_sign_in(secured: TestClient) -> None:
    r = secured.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    for path in ("/api/overview", "/api/changes", "/api/query?q=FIND+*", "/api/silences"):
        assert secured.get(path).status_code == 401, path
    assert secured.get("/api/me", headers=bearer("wrong")).status_code == 401
    assert secured.get("/changes/stream").status_code == 401


def test_bearer_tokens_and_roles(secured: TestClient) -> None:
    me = secured.get("/api/me", headers=bearer(VIEWER_TOKEN)).json()
    assert me == {"name": "alice", "role": "viewer", "via": "token", "auth_required": True}
    assert secured.get("/api/overview", headers=bearer(VIEWER_TOKEN)).status_code == 200
    # a viewer may not act; an operator may (no CSRF for bearer requests: no ambient credential)
    body = {"matchers": ["subject=x"], "duration": "1h"}
    r = secured.post("/api/silences", json=body, headers=bearer(VIEWER_TOKEN))
    assert r.status_code == 403
    r = secured.post("/api/silences", json=body, headers=bearer(OPERATOR_TOKEN))
    assert r.status_code == 201 and r.json()["created_by"] == "olga"
    audit = secured.get("/api/audit", headers=bearer(VIEWER_TOKEN)).json()
    assert any(a["user"] == "alice" and a["ok"] is False for a in audit)


def test_sign_in_with_token_session_cookie_and_sign_out(secured: TestClient) -> None:
    secured.cookies.clear()
    page = secured.get("/login")
    first_sid = secured.cookies.get("mde_sid")
    set_cookie = page.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "secure" in set_cookie and "samesite=lax" in set_cookie
    token = csrf_of(page.text)
    bad = secured.post("/login", data={"token": "nope", "csrf": token})
    assert bad.status_code == 401 and "not valid" in bad.text
    assert secured.post("/login", data={"token": VIEWER_TOKEN}).status_code == 403  # no CSRF
    r = secured.post(
        "/login",
        data={"token": VIEWER_TOKEN, "csrf": token, "next": "/alerts"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    assert secured.cookies.get("mde_sid") != first_sid  # a fresh session id at sign-in
    assert secured.get("/api/me").json()["name"] == "alice"
    html = secured.get("/alerts").text
    assert VIEWER_TOKEN not in html and OPERATOR_TOKEN not in html
    new_token = csrf_of(html)
    assert new_token != token
    refused = secured.post(
        "/alerts/silences",
        data={"matchers": "subject=y", "duration": "1h", "csrf": new_token},
    )
    assert refused.status_code == 403 and "operator" in refused.text
    out = secured.post("/logout", data={"csrf": new_token}, follow_redirects=False)
    assert out.status_code == 303
    assert secured.get("/api/me").status_code == 401


def test_open_redirects_are_refused(secured: TestClient) -> None:
    secured.cookies.clear()
    token = csrf_of(secured.get("/login").text)
    r = secured.post(
        "/login",
        data={"token": VIEWER_TOKEN, "csrf": token, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/"


def test_static_assets_and_vendored_cytoscape(local: TestClient) -> None:
    r = local.get("/static/vendor/cytoscape.esm.min.mjs")
    assert r.status_code == 200 and "export{" in r.text.replace(" ", "")
    assert "javascript" in r.headers["content-type"]
    assert local.get("/static/vendor/cytoscape.LICENSE").status_code == 200


def test_live_timeline_over_sse(world: dict) -> None:
    """A browser connected to /changes/stream gets the next sync's events, filtered, with the
    ones committed between page render (`after`) and connect replayed first."""
    import httpx
    from detect_helpers import build_graph, commit, standard_tenant

    from monitor.snapshot.store import SnapshotStore

    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    served = Served(create_app(s, host="127.0.0.1"))
    try:
        with httpx.Client(base_url=served.url, timeout=20) as http:
            page = http.get("/changes", params={"type": "mde.machine.*"}).text
            stream_url = re.search(r'data-stream="([^"]+)"', page).group(1).replace("&amp;", "&")
            assert "after=" in stream_url
            # committed after the page was rendered, before the browser connects: replayed
            t = standard_tenant(machines=10)
            t.machines["m00"]["computerDnsName"] = SCRIPT_NAME
            t.machines["m01"]["computerDnsName"] = CHANNEL_NAME
            for m in ("m00", "m01"):
                t.machines[m]["riskScore"] = "High"
            t.machines["m02"]["exposureLevel"] = "High"
            t.machines["m03"]["healthStatus"] = "Inactive"
            store = SnapshotStore(world["client"], world["prefix"])
            commit(store, build_graph(t), finished="2099-01-01T00:00:00.000Z")
            rows: list[dict] = []
            deadline = time.monotonic() + 30
            with http.stream("GET", stream_url) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                for line in resp.iter_lines():
                    assert time.monotonic() < deadline, f"no live event; got {rows}"
                    if not line.startswith("data: "):
                        continue
                    rows.append(json.loads(line[6:]))
                    subjects = {r["subject"] for r in rows}
                    if subjects == {MACHINE.key("m03")}:
                        # now a commit while connected: it arrives live
                        t.machines["m04"]["healthStatus"] = "Inactive"
                        commit(store, build_graph(t), finished="2099-01-01T00:01:00.000Z")
                    if MACHINE.key("m04") in subjects:
                        break
        assert all(r["type"].startswith("mde.machine.") for r in rows)
        assert {r["subject"] for r in rows} >= {MACHINE.key("m03"), MACHINE.key("m04")}
        assert len({r["event_id"] for r in rows}) == len(rows)  # no duplicates
    finally:
        served.stop()


def test_config_page_shows_no_secret(secured: TestClient) -> None:
    doc = secured.get("/api/config", headers=bearer(VIEWER_TOKEN)).json()
    text = json.dumps(doc)
    for secret in ("not-a-real-secret", VIEWER_TOKEN, OPERATOR_TOKEN):
        assert secret not in text
    assert doc["tenants"][0]["client_secret"] == "***"
    assert doc["web"]["tokens"][0]["token"] == "***"
    assert doc["web"]["tokens"][0]["name"] == "alice"
    secured.cookies.clear()
    token = csrf_of(secured.get("/login").text)
    secured.post("/login", data={"token": VIEWER_TOKEN, "csrf": token})
    html = secured.get("/config").text
    assert "not-a-real-secret" not in html and VIEWER_TOKEN not in html and "***" in html


def test_config_doc_masks_url_passwords(world: dict) -> None:
    """Passwords inside URLs (Redis userinfo or ?password=, a proxy's userinfo) are masked too."""
    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    for redis_url in (
        "rediss://default:redis-pass-1@cache.example:6380/0",
        "redis://cache.example:6379/0?password=redis-pass-2",
    ):
        proxied = s.http.model_copy(update={"proxy": "http://bob:proxy-pass-3@proxy.example:3128"})
        doc = config_doc(s.model_copy(update={"redis_url": redis_url, "http": proxied}))
        text = json.dumps(doc)
        assert "redis-pass" not in text and "proxy-pass" not in text, text
        assert "cache.example" in doc["redis_url"] and "***" in doc["redis_url"]
        assert doc["http"]["proxy"] == "http://bob:***@proxy.example:3128"


def test_trigger_sync_and_accept_drop_enqueue_a_task(secured: TestClient, world: dict) -> None:
    import base64

    r = secured.post(
        f"/api/tenants/{TENANT}/sync", json={"accept_drop": True}, headers=bearer(OPERATOR_TOKEN)
    )
    assert r.status_code == 202 and r.json()["accept_drop"] is True
    raw = world["client"].lrange(f"{world['prefix']}:celery:sync", 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in raw]
    assert [TENANT] in [b[0] for b in bodies]
    assert any(b[1] == {"origin": "console", "accept_drop": True} for b in bodies)
    assert (
        secured.post(f"/api/tenants/{TENANT}/sync", headers=bearer(VIEWER_TOKEN)).status_code == 403
    )
    audit = secured.get("/api/audit", headers=bearer(VIEWER_TOKEN)).json()
    assert ("olga", "sync.accept_drop", TENANT) in [
        (a["user"], a["action"], a["target"]) for a in audit
    ]


def test_notifications_link_back_to_console_and_defender(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    alerts = write_alerts(tmp_path / "alerts")
    s = settings_for(redis_url, redis_prefix, alerts, public_url="https://console.example/")
    populate(redis.Redis.from_url(redis_url), s)
    sent = [json.loads(line) for line in (alerts / "alerts.jsonl").read_text().splitlines()]
    (n,) = [x for x in sent if x.get("rule") == "machine-risk-raised"]
    text = json.dumps(n)
    assert f"https://console.example/entities/{quote(M00, safe='')}?tenant={TENANT}" in text
    assert "https://security.microsoft.com/machines/m00/overview?tid=" in text
    assert "https://console.example/alerts#rule-machine-risk-raised" in text


def test_unfiltered_live_timeline_gets_every_new_event(world: dict) -> None:
    import httpx
    from detect_helpers import build_graph, commit, standard_tenant

    from monitor.snapshot.store import SnapshotStore

    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    served = Served(create_app(s, host="127.0.0.1"))
    store = SnapshotStore(world["client"], world["prefix"])
    try:
        with httpx.Client(base_url=served.url, timeout=20) as http:
            rows: list[dict] = []
            deadline = time.monotonic() + 30
            with http.stream("GET", "/changes/stream") as resp:
                t = standard_tenant(machines=10)
                t.machines["m07"]["machineTags"] = ["rebuild"]
                commit(store, build_graph(t), finished="2099-01-01T00:02:00.000Z")
                for line in resp.iter_lines():
                    assert time.monotonic() < deadline, f"no live event; got {rows}"
                    if line.startswith("data: "):
                        rows.append(json.loads(line[6:]))
                    if any(r["subject"] == MACHINE.key("m07") for r in rows):
                        break
        assert len({r["id"] for r in rows}) == len(rows)
    finally:
        served.stop()


def test_api_query_equals_the_cli_query_json(
    local: TestClient, world: dict, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from monitor.cli import app as cli_app

    s = settings_for(world["redis_url"], world["prefix"], world["alerts"])
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(
        json.dumps(
            s.model_dump(mode="json", exclude={"web"})
            | {
                "tenants": [
                    {**t, "client_secret": "not-a-real-secret"}
                    for t in s.model_dump(mode="json")["tenants"]
                ]
            }
        )
    )
    q = "FIND microsoft_defender_machine WITH riskScore = 'High'"
    for extra in ([], ["--limit", "1"]):
        res = CliRunner().invoke(
            cli_app, ["--config", str(cfg), "query", "--json", "--tenant", TENANT, *extra, q]
        )
        assert res.exit_code == 0, res.output
        params = {"q": q, "tenant": TENANT, **({"limit": "1"} if extra else {})}
        assert local.get("/api/query", params=params).json() == json.loads(res.stdout)
