"""The identity rule pack (alerts/identity.yaml), each rule fed the events of real syncs: a
generated tenant behind the simulator is changed the way an intruder or a leaver would, synced,
and the committed events go through the whole alert pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alert_helpers import FakeClock, RecordingSink, settings_for
from identity_helpers import identity_env, of_type
from test_identity_mapping import HR_COLUMNS, logon, write_hr_csv

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.rules import load_rules

PACK = Path(__file__).resolve().parent.parent / "alerts"
IDENTITY_RULES = frozenset(
    {
        "identity-unmapped-interactive-logon",
        "identity-inactive-account-logon",
        "identity-logon-after-termination",
        "identity-domain-admin-on-workstation",
        "identity-directory-role-assigned",
        "identity-role-assignable-group-member-added",
        "identity-terminated-employee-enabled",
    }
)


def test_identity_rules_fire_on_real_sync_events(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    hr = tmp_path / "hr.csv"
    identity = {"hr_file": {"path": str(hr), "columns": HR_COLUMNS}}
    with identity_env(
        tmp_path, redis_url, redis_prefix, identity=identity, machines=4, users=80, groups=6
    ) as env:
        t = env.tenant
        ids = sorted(t.machines)
        workstation, server = ids[0], ids[1]
        t.set_machine(workstation, osPlatform="Windows11")
        t.set_machine(server, osPlatform="WindowsServer2022")
        host = str(t.machines[workstation]["computerDnsName"]).split(".")[0].upper()
        # a leaver: an enabled member whose generated logon user maps by SID
        sids = {lu["accountSid"]: lu for lus in t.logon_users.values() for lu in lus}
        synced = [
            u
            for u in t.users.values()
            if u.get("onPremisesSecurityIdentifier") and u["accountEnabled"] and u.get("employeeId")
        ]
        leaver = next(u for u in synced if u["onPremisesSecurityIdentifier"] in sids)
        disabled, admin = [u for u in synced if u is not leaver][:2]
        netbios = str(admin["onPremisesDomainName"]).split(".")[0].upper()
        rows = [
            (u["userPrincipalName"], str(u["employeeId"]), "n", "", "Active", "") for u in synced
        ]
        write_hr_csv(hr, rows)
        groups = sorted(t.directory.groups)
        t.set_group(groups[0], isAssignableToRole=True)
        assert env.sync()[0].status == "ok"

        # what happens between two syncs
        t.add_logon_user(workstation, logon("helpdesk", host, "S-1-5-21-9-9-9-1001"))
        t.set_user(disabled["id"], accountEnabled=False)
        t.add_logon_user(
            server,
            logon(
                disabled["onPremisesSamAccountName"],
                netbios,
                disabled["onPremisesSecurityIdentifier"],
            ),
        )
        da = logon(
            admin["onPremisesSamAccountName"], netbios, admin["onPremisesSecurityIdentifier"]
        )
        da["isDomainAdmin"] = True
        t.add_logon_user(workstation, da)
        t.add_logon_user(server, da)  # on a server: not the workstation rule
        t.assign_role("Global Administrator", admin["id"])
        outsider = next(
            u for u in t.users.values() if u["id"] not in t.directory.members[groups[0]]
        )
        t.add_group_member(groups[0], outsider["id"])
        if outsider["id"] not in t.directory.members[groups[1]]:  # not role-assignable: no alert
            t.add_group_member(groups[1], outsider["id"])
        rows = [
            (r[0], r[1], r[2], r[3], "Terminated", "2024-01-01")
            if r[1] == str(leaver["employeeId"])
            else r
            for r in rows
        ]
        write_hr_csv(hr, rows)
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete

    ruleset = load_rules(PACK)
    assert ruleset.errors == []
    fired: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        for rule, status in ruleset.evaluate(ev):
            if status == "firing":
                fired.setdefault(rule.name, []).append(ev)
    assert fired.keys() >= IDENTITY_RULES, sorted(fired)

    def subjects(rule: str) -> list[str]:
        return sorted(e["subject"] for e in fired[rule])

    assert [
        e["data"]["target"]["accountKind"] for e in fired["identity-unmapped-interactive-logon"]
    ] == ["local"]
    assert [
        e["data"]["target"]["directoryUserState"] for e in fired["identity-inactive-account-logon"]
    ] == ["disabled"]
    domain_admin = fired["identity-domain-admin-on-workstation"]
    assert [e["data"]["source"]["id"] for e in domain_admin] == [workstation]
    assert [
        e["data"]["target"]["displayName"] for e in fired["identity-directory-role-assigned"]
    ] == ["Global Administrator"]
    assert [
        e["data"]["source"]["id"] for e in fired["identity-role-assignable-group-member-added"]
    ] == [groups[0]]
    assert subjects("identity-terminated-employee-enabled") == [f"employee:{leaver['employeeId']}"]
    after = fired["identity-logon-after-termination"]
    assert after and all(e["data"]["entity"]["employeeStatus"] == "terminated" for e in after)

    # and through the pipeline: one notification per rule
    sinks = {"stdout": RecordingSink("stdout"), "file": RecordingSink("file")}
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, redis_prefix, PACK),
        redis_client,
        env.name,
        ruleset=ruleset,
        sinks=sinks,
        clock=clock,
        sleep=clock.sleep,
    )
    d.drain(5)
    sent = {n.rule for n in sinks["file"].sent if n.status == "firing"}
    assert sent >= IDENTITY_RULES


def test_a_disabled_account_logging_on_again_to_a_machine_it_used_is_caught(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix, machines=4, users=80) as env:
        t = env.tenant
        by_sid = {
            u["onPremisesSecurityIdentifier"]: u
            for u in t.users.values()
            if u.get("onPremisesSecurityIdentifier") and u["accountEnabled"]
        }
        machine, account = next(
            (m, lu)
            for m, lus in sorted(t.logon_users.items())
            for lu in lus
            if lu["accountSid"] in by_sid
        )
        user = by_sid[account["accountSid"]]
        assert env.sync()[0].status == "ok"

        # disabled: the user's own events, nothing about logons (none happened)
        t.set_user(user["id"], accountEnabled=False)
        summary, events = env.sync()
        assert summary.status == "ok"
        assert of_type(events, "mde.machine_logon_user.logged_on") == []

        # the account logs on again to the same machine: lastSeen moves on
        with t.lock:
            t.logon_users[machine] = [
                {**lu, "lastSeen": "2099-01-01T00:00:00Z"} if lu["id"] == account["id"] else lu
                for lu in t.logon_users[machine]
            ]
        t.touch_all_machines()
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        logged_on = of_type(events, "mde.machine_logon_user.logged_on")
        assert [e["subject"] for e in logged_on] == [
            f"microsoft_defender_machine:{machine}|has|microsoft_defender_logon_user:{account['id']}"
        ]
        data = logged_on[0]["data"]
        assert data["target"]["directoryUserState"] == "disabled"
        assert data["changes"]["lastSeenOn"]["new"] > (data["changes"]["lastSeenOn"]["old"] or 0)

        ruleset = load_rules(PACK)
        fired = [r.name for r, status in ruleset.evaluate(logged_on[0]) if status == "firing"]
        assert fired == ["identity-inactive-account-logon"]

        # an enabled account's repeat logons stay quiet (volatile facts, no event): its lastSeen
        # moves on too, so only the account-state filter keeps this sync quiet
        other_machine, other = next(
            (m, lu)
            for m, lus in sorted(t.logon_users.items())
            for lu in lus
            if lu["accountSid"] in by_sid and lu["accountSid"] != account["accountSid"]
        )
        with t.lock:
            t.logon_users[other_machine] = [
                {**lu, "lastSeen": "2099-01-02T00:00:00Z"} if lu["id"] == other["id"] else lu
                for lu in t.logon_users[other_machine]
            ]
        t.touch_all_machines()
        summary, events = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert of_type(events, "mde.machine_logon_user.logged_on") == []
