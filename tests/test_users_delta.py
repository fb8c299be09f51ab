"""Users through `/users/delta`: a full first read, then only changes; 410 resync, failed pages
and crashes before the commit lose nothing and invent nothing (real simulator, real Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from identity_helpers import Env, identity_env, of_type
from simulator_helpers import token

from monitor.collect.check import check_tenant
from monitor.collect.collector import collect_tenant
from monitor.collect.users import USERS_DELTA, UsersState, UsersStateStore
from monitor.events.stream import read_range
from monitor.simulator.faults import Fault
from monitor.snapshot.commit import CRASH_ENV
from monitor.snapshot.lock import lock_key
from monitor.snapshot.store import SnapshotStore

USER_KEY = "microsoft_defender_user:{}"
USER_TYPE = "microsoft_defender_user"
ROOT = Path(__file__).resolve().parent.parent


def link(env: Env) -> bytes | None:
    """The stored users delta link."""
    value: bytes | None = env.client.get(UsersStateStore(None, env.prefix, env.name).link_key)
    return value


def stored_users(env: Env) -> dict[str, Any]:
    graph = SnapshotStore(env.client, env.prefix).load_graph(env.name)
    assert graph is not None
    return {k: e for k, e in graph.entities.items() if e["_type"] == USER_TYPE}


def listed_users(env: Env) -> dict[str, Any]:
    """The user entities a full-list read of the tenant gives now (no Redis: the list)."""
    result = collect_tenant(env.settings, env.settings.tenants[0])
    assert result.graph is not None and result.stats.requests.get("graph:/users")
    return {k: e for k, e in result.graph.entities.items() if e["_type"] == USER_TYPE}


def users_read(env: Env) -> str | None:
    """How the last sync read the users (its metadata)."""
    meta = SnapshotStore(env.client, env.prefix).meta(env.name)
    assert meta is not None
    value: str | None = meta.get("users_read")
    return value


def enabled_users(env: Env, n: int) -> list[str]:
    return [u for u, doc in sorted(env.tenant.users.items()) if doc.get("accountEnabled")][:n]


def test_first_sync_reads_everyone_then_a_quiet_sync_is_one_request(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert of_type(events, "mde.sync.baseline")
        assert env.graph_requests(USERS_DELTA) == 3  # 200 + 200 + 50, the last with the link
        assert env.graph_requests("graph:/users") == 0
        assert summary.counts[USER_TYPE] == 450
        assert users_read(env) == "delta (full)"
        # the same users, field for field, as the full list gives them
        assert stored_users(env) == listed_users(env)

        # the state is large: a quiet round writes only the link. A TTL set here survives
        # only if the state key is not written again (SET clears it)
        state_key = UsersStateStore(None, env.prefix, env.name).key
        assert env.client.expire(state_key, 3600)
        summary, events = env.sync()
        assert env.graph_requests(USERS_DELTA) == 1
        assert events == []
        assert env.client.ttl(state_key) > 0
        assert users_read(env) == "delta (changes)"


def test_changes_adds_and_deletions_give_the_usual_events(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        env.sync()
        disabled, retitled, gone = enabled_users(env, 3)
        t = env.tenant
        t.set_user(disabled, accountEnabled=False)
        t.set_user(retitled, jobTitle="Chief Delta Officer")
        t.remove_user(gone)
        added = t.add_user()["id"]
        untracked = enabled_users(env, 4)[-1]
        t.set_user(untracked, city="Nowhere")  # not selected: Graph does not report it
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert env.graph_requests(USERS_DELTA) == 1
        state_key = UsersStateStore(None, env.prefix, env.name).key
        assert env.client.ttl(state_key) == -1  # changed: the state was saved again
        kinds = {(e["type"], e["subject"]) for e in events if e["type"].startswith("mde.user.")}
        assert kinds == {
            ("mde.user.disabled", USER_KEY.format(disabled)),
            ("mde.user.updated", USER_KEY.format(disabled)),
            ("mde.user.updated", USER_KEY.format(retitled)),
            ("mde.user.deleted", USER_KEY.format(gone)),
            ("mde.user.created", USER_KEY.format(added)),
        }
        updated = {e["subject"]: e for e in of_type(events, "mde.user.updated")}
        assert updated[USER_KEY.format(retitled)]["data"]["changes"]["jobTitle"]["new"] == (
            "Chief Delta Officer"
        )
        assert summary.counts[USER_TYPE] == 450
        assert stored_users(env) == listed_users(env)


def test_expired_token_resyncs_without_phantom_deletions(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        env.sync()
        victim = enabled_users(env, 1)[0]
        env.tenant.set_user(victim, accountEnabled=False)
        env.tenant.expire_user_delta_tokens()
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert env.graph_requests(USERS_DELTA) == 1 + 3  # the 410, then the full read
        assert users_read(env) == "delta (full)"
        user_events = sorted(e["type"] for e in events if e["type"].startswith("mde.user."))
        assert user_events == ["mde.user.disabled", "mde.user.updated"]  # nothing invented
        assert summary.counts[USER_TYPE] == 450
        _, events = env.sync()  # the full read's link was kept
        assert events == [] and env.graph_requests(USERS_DELTA) == 1


def test_a_failed_page_keeps_the_users_and_the_state(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        first, _ = env.sync()
        disabled, gone = enabled_users(env, 2)
        env.tenant.set_user(disabled, accountEnabled=False)
        env.tenant.remove_user(gone)
        before = link(env)
        env.sim.add_fault(
            Fault(USERS_DELTA, status=500, retry_after=None, tenant_id=env.tenant.tenant_id)
        )
        summary, events = env.sync()
        assert summary.status == "degraded" and "users" in summary.scopes_incomplete
        assert USERS_DELTA in (summary.scopes_incomplete["users"] or "")
        assert not [e for e in events if e["type"].startswith("mde.user.")]
        assert summary.counts[USER_TYPE] == first.counts[USER_TYPE]  # nobody deleted
        assert link(env) == before  # the state did not move
        env.sim.clear_faults()
        summary, events = env.sync()  # the same changes, read again
        assert summary.status == "ok", summary.scopes_incomplete
        kinds = {(e["type"], e["subject"]) for e in events if e["type"].startswith("mde.user.")}
        assert ("mde.user.deleted", USER_KEY.format(gone)) in kinds
        assert ("mde.user.disabled", USER_KEY.format(disabled)) in kinds


def test_a_page_failing_in_the_middle_of_a_resync_keeps_everything(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        first, _ = env.sync()
        env.tenant.expire_user_delta_tokens()
        before = link(env)
        # the 410 and the full read's first page pass; its second page fails
        env.sim.add_fault(Fault(USERS_DELTA, status=500, retry_after=None, after=2, times=None))
        summary, events = env.sync()
        assert summary.status == "degraded" and "users" in summary.scopes_incomplete
        assert summary.counts[USER_TYPE] == first.counts[USER_TYPE]
        assert [e["type"] for e in events] == ["mde.sync.degraded"]
        assert link(env) == before
        env.sim.clear_faults()
        summary, events = env.sync()  # 410 again, full read, no change
        assert summary.status == "ok" and events == []


def _sync_in_a_process_that_dies(env: Env, tmp_path: Path, crash_at: str) -> int:
    """`mde-monitor sync` in a child process that SIGKILLs itself at `crash_at` in the commit;
    then the dead child's tenant lock is freed (its TTL would) and its events counted as seen."""
    config = tmp_path / f"config-{crash_at}.yaml"
    data = yaml.safe_load(env.sim.config_yaml())
    data.update(redis_url=env.settings.redis_url, redis_prefix=env.prefix)
    config.write_text(yaml.safe_dump(data))
    child_env = {**os.environ, "MDE_MONITOR_CONFIG": str(config), CRASH_ENV: crash_at}
    child_env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", "from monitor.cli import main; main()", "sync", "-t", env.name],
        env=child_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    env.client.delete(lock_key(env.prefix, env.name))
    env.seen = sum(1 for _ in read_range(env.client, env.prefix, env.name))
    return done.returncode


def test_a_crash_before_the_commit_reads_the_same_changes_again(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        env.sync()
        before = link(env)
        disabled = enabled_users(env, 1)[0]
        env.tenant.set_user(disabled, accountEnabled=False)
        assert _sync_in_a_process_that_dies(env, tmp_path, "before_exec") == -9
        assert link(env) == before  # collected, not committed: the state did not move
        summary, events = env.sync()
        assert env.graph_requests(USERS_DELTA) == 1
        assert ("mde.user.disabled", USER_KEY.format(disabled)) in {
            (e["type"], e["subject"]) for e in events
        }

        # committed, then killed before the state was saved: the change is read again and
        # is already in the snapshot, so nothing is reported twice
        retitled = enabled_users(env, 1)[0]
        env.tenant.set_user(retitled, jobTitle="Survivor")
        before = link(env)
        assert _sync_in_a_process_that_dies(env, tmp_path, "after_exec") == -9
        assert link(env) == before
        summary, events = env.sync()
        assert summary.status == "ok" and env.graph_requests(USERS_DELTA) == 1
        assert events == []
        assert stored_users(env)[USER_KEY.format(retitled)]["jobTitle"] == "Survivor"


def test_managers_come_with_the_delta_and_switching_reads_is_quiet(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    identity = {"directory_employees": {"managers": True}}
    with identity_env(
        tmp_path,
        redis_url,
        redis_prefix,
        identity=identity,
        tenant_options={"users_delta": False},
        users=150,
    ) as env:
        env.sync()
        assert env.graph_requests("graph:/users") == 2
        env.settings.tenants[0].users_delta = True  # first delta round: everyone, no event
        summary, events = env.sync()
        assert env.graph_requests(USERS_DELTA) == 1 and env.graph_requests("graph:/users") == 0
        assert summary.status == "ok" and events == []
        d = env.tenant.directory
        user, boss = next(iter(d.managers.items()))
        other = next(b for b in set(d.managers.values()) if b != boss)
        env.tenant.set_manager(user, other)
        lone = next(u for u in d.managers if u != user)
        env.tenant.set_manager(lone, None)
        summary, events = env.sync()
        assert env.graph_requests(USERS_DELTA) == 1
        assert stored_users(env) == listed_users(env)  # the managers too (in _rawData)
        managed = {
            u: e["_rawData"][0]["rawData"].get("manager", {}).get("id")
            for u, e in stored_users(env).items()
        }
        assert managed[USER_KEY.format(user)] == other
        assert managed[USER_KEY.format(lone)] is None
        # back to the list: the same users, nothing reported
        env.settings.tenants[0].users_delta = False
        summary, events = env.sync()
        assert env.graph_requests("graph:/users") == 2 and events == []
        assert users_read(env) == "list"
        # delta again, without managers: the stored state (read with `manager` selected) is not
        # reused (the managers' relationships go: the drop guard holds them, no user event)
        env.settings.tenants[0].users_delta = True
        env.settings.tenants[0].identity.directory_employees.managers = False
        summary, events = env.sync()
        assert users_read(env) == "delta (full)" and env.graph_requests(USERS_DELTA) == 1
        assert not [e for e in events if e["type"].startswith("mde.user.")]


def test_check_probes_the_users_read_the_sync_does(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        env.sim.reset_counts()
        probes = {p.permission: p for p in check_tenant(env.settings, env.settings.tenants[0])}
        assert probes["Directory.Read.All"].ok, probes["Directory.Read.All"].detail
        counts = env.sim.counts()
        assert counts[USERS_DELTA] == 1 and "graph:/users" not in counts  # latest: no users
        env.tenant.set_roles(["Organization.Read.All", "Machine.Read.All", "User.Read.All"])
        probes = {p.permission: p for p in check_tenant(env.settings, env.settings.tenants[0])}
        assert probes["Directory.Read.All"].ok is False
        assert probes["Directory.Read.All"].reason == "permission"


def test_simulated_delta_pages_and_tokens_behave_like_graph(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        result = collect_tenant(env.settings, env.settings.tenants[0], redis_client=env.client)
        assert result.users is not None and result.users.state is not None
        delta_link = result.users.state.delta_link
        assert delta_link is not None and "$deltatoken=" in delta_link
        with env.sim.http_client() as client:
            client.headers["Authorization"] = f"Bearer {token(env.sim, client, env.tenant)}"

            def get(url: str, **params: Any) -> httpx.Response:
                return client.get(url, params=params or None)

            # $top is ignored on delta: Graph pages users by 200 there
            url = f"{env.sim.graph_url}/v1.0/users/delta"
            first = get(url, **{"$top": "5", "$select": "id,displayName"}).json()
            assert len(first["value"]) == 200 and "@odata.nextLink" in first
            assert set(first["value"][0]) <= {"id", "displayName"}
            assert get(url, **{"$select": "nope"}).status_code == 400
            assert get(url, **{"$expand": "manager"}).status_code == 400  # $select it instead
            latest = get(url, **{"$deltatoken": "latest"}).json()  # "sync from now"
            assert latest["value"] == [] and "@odata.deltaLink" in latest
            # a changed user comes with its selected properties, those never set left out and
            # those set to null in the window included
            uid = next(u for u, doc in sorted(env.tenant.users.items()) if doc["mobilePhone"])
            env.tenant.set_user(uid, mobilePhone=None, jobTitle="Tester")
            items = get(delta_link).json()["value"]
            assert [i["id"] for i in items] == [uid]
            assert items[0]["jobTitle"] == "Tester" and items[0]["mobilePhone"] is None
            assert "displayName" in items[0] and "@removed" not in items[0]
            assert [k for k, v in items[0].items() if v is None] == ["mobilePhone"]
            env.tenant.remove_user(uid)
            assert get(delta_link).json()["value"] == [
                {"id": uid, "@removed": {"reason": "changed"}}
            ]
            env.tenant.expire_user_delta_tokens()
            gone = get(delta_link)
            assert gone.status_code == 410
            assert gone.json()["error"]["code"] == "syncStateNotFound"
            assert get(latest["@odata.deltaLink"]).status_code == 410


def test_the_users_state_is_packed_once_the_graph_has_the_users(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """A big tenant's users are not held twice through the sync: once the builder has them,
    the state keeps only the packed value it will save (when it changed)."""
    with identity_env(tmp_path, redis_url, redis_prefix, users=450) as env:
        tenant = env.settings.tenants[0]
        first = collect_tenant(env.settings, tenant, redis_client=env.client)
        assert first.users is not None and first.users.state is not None
        state = first.users.state
        assert state.users == {} and state.sealed
        assert len(UsersState.loads(state.dumps()).users) == 450
        env.sync()  # commits and saves a state of its own
        quiet = collect_tenant(env.settings, tenant, redis_client=env.client)
        assert quiet.users is not None and quiet.users.state is not None
        assert not quiet.users.state.changed and quiet.users.state.users == {}
        with pytest.raises(ValueError, match="unchanged"):
            quiet.users.state.dumps()  # nothing to write: save() writes only the link
