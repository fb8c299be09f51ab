"""The identity lane: users, groups, roles and employees between full syncs; the rest is kept,
nothing is deleted or degraded, and the full sync then sees the rest (real simulator, Redis)."""

from __future__ import annotations

from pathlib import Path

from identity_helpers import identity_env, of_type

from monitor.model import schema
from monitor.snapshot.store import SnapshotStore

MACHINE = schema.MACHINE.type
USER = schema.USER.type


def test_identity_lane_reads_identity_only_and_keeps_the_rest(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, machines=8, users=40) as env:
        skipped, _ = env.sync(lane="identity")  # nothing to keep yet: waits for a full sync
        assert skipped.status == "skipped" and "first full sync" in str(skipped.error)
        assert SnapshotStore(env.client, env.prefix).generation(env.name) == 0

        full, _ = env.sync()
        assert full.status == "ok" and full.lane == "full"
        t = env.tenant
        user = next(u for u, d in sorted(t.users.items()) if d.get("accountEnabled"))
        t.set_user(user, accountEnabled=False)
        machine = sorted(t.machines)[0]
        t.set_machine(
            machine, riskScore="High" if t.machines[machine]["riskScore"] != "High" else "Low"
        )
        t.add_machine()

        fast, events = env.sync(lane="identity")
        assert fast.status == "ok" and fast.lane == "identity", fast.scopes_incomplete
        assert fast.scopes_incomplete == {}  # planned skips are not worth a line
        assert [e["subject"] for e in of_type(events, "mde.user.disabled")] == [
            schema.USER.key(user)
        ]
        assert not [e for e in events if e["type"].startswith("mde.machine.")]
        assert not of_type(events, "mde.sync.degraded")
        asked = fast.requests["requests"]
        assert asked and not [k for k in asked if k.startswith("defender:")], asked
        assert fast.counts[MACHINE] == full.counts[MACHINE]  # kept, not deleted
        assert fast.counts[USER] == full.counts[USER]
        meta = SnapshotStore(env.client, env.prefix).meta(env.name)
        assert meta is not None and meta["lane"] == "identity" and meta["status"] == "ok"
        assert meta["scopes"][schema.SCOPE_MACHINES]["state"] == "skipped"
        assert "machines" not in meta["aggregates"]  # not counted: not read this time
        history = SnapshotStore(env.client, env.prefix).history(env.name)
        assert [h.get("lane") for h in history] == ["full"]  # the plots' history: full syncs

        again, events = env.sync()  # the full sync sees the machines, not the user again
        assert again.status == "ok"
        assert of_type(events, "mde.machine.created")
        assert not of_type(events, "mde.user.disabled")
        assert again.counts[MACHINE] == full.counts[MACHINE] + 1
