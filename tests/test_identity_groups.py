"""Groups (delta) and directory roles: requests, paging, changes, 410 resync, no phantom deletions."""

from __future__ import annotations

from pathlib import Path

from identity_helpers import identity_env, of_type

from monitor.simulator.faults import Fault

DELTA = "graph:/groups/delta"
USER_KEY = "microsoft_defender_user:{}"


def test_first_sync_pages_large_groups_then_delta_reports_only_changes(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, users=80, groups=12) as env:
        d = env.tenant.directory
        d.links_per_page, d.groups_per_page = 25, 5  # force members over several pages
        big = sorted(d.groups)[3]
        for uid in list(env.tenant.users)[:70]:
            d.members[big][uid] = None
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert of_type(events, "mde.sync.baseline")
        links = sum(len(m) for m in d.members.values())
        assert env.graph_requests(DELTA) >= links // 25  # really paged
        assert summary.counts["entra_group"] == 12
        assert summary.counts["entra_group_has_microsoft_defender_user"] == links
        member_events = [e for e in events if e["type"].startswith("mde.group.")]
        assert member_events == []  # first sync: a baseline, no per-item events

        # the saved state is large: a quiet round writes only the link. A TTL set here survives
        # only if the state key is not written again (SET clears it)
        state_key = f"{env.prefix}:groups_delta:{env.name}"
        assert env.client.expire(state_key, 3600)
        summary, events = env.sync()  # quiet: one delta request, nothing new
        assert env.graph_requests(DELTA) == 1
        assert [e["type"] for e in events] == []
        assert env.client.ttl(state_key) > 0

        users = list(env.tenant.users)
        victim, newcomer = next(iter(d.members[big])), users[-1]
        env.tenant.remove_group_member(big, victim)
        env.tenant.add_group_member(big, newcomer if newcomer not in d.members[big] else users[-2])
        gone = sorted(d.groups)[0]
        env.tenant.remove_group(gone)
        promoted = sorted(d.groups)[1]
        env.tenant.set_group(promoted, isAssignableToRole=True)
        summary, events = env.sync()
        assert env.graph_requests(DELTA) == 1
        assert env.client.ttl(state_key) == -1  # changed: the state was saved again
        removed = of_type(events, "mde.group.member_removed")
        assert [e["data"]["target"]["_key"] for e in removed] == [USER_KEY.format(victim)]
        added = of_type(events, "mde.group.member_added")
        assert len(added) == 1 and added[0]["data"]["source"]["id"] == big
        deleted = of_type(events, "mde.group.deleted")
        assert [e["data"]["entity"]["id"] for e in deleted] == [gone]
        updated = of_type(events, "mde.group.updated")
        assert updated[0]["data"]["changes"]["isAssignableToRole"] == {"old": False, "new": True}
        # a deleted group's memberships go with it, without one member_removed each
        assert all(e["data"]["source"]["id"] != gone for e in removed)
        assert summary.counts["entra_group"] == 11


def test_expired_delta_token_resyncs_without_phantom_changes(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, groups=8) as env:
        env.sync()
        gid = sorted(env.tenant.directory.groups)[2]
        member = next(iter(env.tenant.directory.members[gid]))
        env.tenant.remove_group_member(gid, member)
        env.tenant.expire_group_delta_tokens()
        summary, events = env.sync()
        assert summary.status == "ok"
        assert env.sim.counts()[DELTA] >= 3  # first sync, the 410, the full read
        types = sorted(e["type"] for e in events)
        assert types == ["mde.group.member_removed"]  # the real change, nothing invented
        summary, events = env.sync()
        assert events == [] and env.graph_requests(DELTA) == 1


def test_failed_delta_page_keeps_groups_and_replays_changes_later(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, groups=8) as env:
        env.sync()
        gid = sorted(env.tenant.directory.groups)[0]
        member = next(iter(env.tenant.directory.members[gid]))
        env.tenant.remove_group_member(gid, member)
        env.sim.add_fault(
            Fault(DELTA, status=500, retry_after=None, tenant_id=env.tenant.tenant_id)
        )
        summary, events = env.sync()
        assert summary.status == "degraded" and "groups" in summary.scopes_incomplete
        assert not [e for e in events if e["type"].startswith("mde.group.")]
        assert summary.counts["entra_group"] == 8  # kept
        env.sim.clear_faults()
        summary, events = env.sync()  # the stored delta link was not advanced: change replayed
        assert summary.status == "ok"
        assert [e["type"] for e in events if e["type"].startswith("mde.group.")] == [
            "mde.group.member_removed"
        ]


def test_roles_with_more_members_than_graph_expands_and_assignments(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, roles=20) as env:
        readers = env.tenant._role("Directory Readers")
        assert len(env.tenant.directory.role_members[readers]) == 30
        summary, _ = env.sync()
        assert env.graph_requests("graph:/directoryRoles") == 1
        assert env.graph_requests("graph:/directoryRoles/{id}/members") == 1
        total = sum(len(m) for m in env.tenant.directory.role_members.values())
        assert summary.counts["microsoft_defender_user_assigned_entra_directory_role"] == total
        # a brand-new user made Global Administrator in the same sync is still reported
        user = env.tenant.add_user()
        env.tenant.assign_role("Global Administrator", user["id"])
        old = env.tenant.directory.role_members[readers][0]
        env.tenant.unassign_role("Directory Readers", old)
        _, events = env.sync()
        assigned = of_type(events, "mde.role.assigned")
        assert [e["data"]["target"]["displayName"] for e in assigned] == ["Global Administrator"]
        assert assigned[0]["data"]["source"]["id"] == user["id"]
        assert of_type(events, "mde.user.created")
        unassigned = of_type(events, "mde.role.unassigned")
        assert [e["data"]["source"]["id"] for e in unassigned] == [old]


def test_failed_roles_read_keeps_assignments(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix) as env:
        first, _ = env.sync()
        ga = env.tenant._role("Global Administrator")
        env.tenant.unassign_role(ga, env.tenant.directory.role_members[ga][0])
        env.sim.add_fault(
            Fault(
                "graph:/directoryRoles",
                status=503,
                retry_after=None,
                tenant_id=env.tenant.tenant_id,
            )
        )
        summary, events = env.sync()
        assert summary.status == "degraded" and "directory_roles" in summary.scopes_incomplete
        assert not [e for e in events if e["type"].startswith("mde.role.")]
        rel = "microsoft_defender_user_assigned_entra_directory_role"
        assert summary.counts[rel] == first.counts[rel]
        env.sim.clear_faults()
        _, events = env.sync()
        assert [e["type"] for e in events if e["type"].startswith("mde.role.")] == [
            "mde.role.unassigned"
        ]


def test_a_role_without_id_fails_its_scope_not_the_sync(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix) as env:
        first, _ = env.sync()
        uid = next(u for u, doc in env.tenant.users.items() if doc.get("accountEnabled", True))
        env.tenant.set_user(uid, accountEnabled=False)  # another scope's change: must commit
        with env.tenant.lock:
            env.tenant.directory.roles[""] = {"displayName": "Broken", "roleTemplateId": "t"}
        env.tenant.changed()
        summary, events = env.sync()
        assert summary.status == "degraded"
        error = summary.scopes_incomplete["directory_roles"] or ""
        assert "directoryRoles item" in error and "'id'" in error and "kept" in error, error
        rel = "microsoft_defender_user_assigned_entra_directory_role"
        assert summary.counts[rel] == first.counts[rel]
        assert not [e for e in events if e["type"].startswith("mde.role.")]
        assert ("mde.user.disabled", USER_KEY.format(uid)) in {
            (e["type"], e["subject"]) for e in events
        }
