"""Identity mapping through real syncs: logon accounts to directory users, users to employees,
the HR file (CSV and JSON) and what a malformed one does (reported, nothing deleted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from identity_helpers import Env, identity_env, of_type

from monitor.collect.collector import collect_tenant
from monitor.model.graph import Graph, ScopeState

Json = dict[str, Any]


def logon(name: str, domain: str, sid: str, types: str = "Interactive") -> Json:
    return {
        "id": f"{domain.lower()}\\{name.lower()}",
        "accountName": name,
        "accountDomain": domain,
        "accountSid": sid,
        "firstSeen": "2024-05-01T10:00:00Z",
        "lastSeen": "2024-06-01T10:00:00Z",
        "logonTypes": types,
        "logOnMachinesCount": 1,
        "isDomainAdmin": False,
        "isOnlyNetworkUser": False,
    }


def collect(env: Env) -> Graph:
    result = collect_tenant(env.settings, env.settings.tenants[0], redis_client=env.client)
    assert result.graph is not None
    return result.graph


def entity(graph: Graph, key: str) -> Json:
    return graph.entities[key]


def rels(graph: Graph, typ: str) -> dict[str, Json]:
    return {k: r for k, r in graph.relationships.items() if r["_type"] == typ}


def test_logon_accounts_map_by_sid_sam_and_upn_and_get_a_kind(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with identity_env(tmp_path, redis_url, redis_prefix) as env:
        t = env.tenant
        synced = [u for u in t.users.values() if u.get("onPremisesSecurityIdentifier")]
        cloud = [
            u
            for u in t.users.values()
            if not u.get("onPremisesSyncEnabled") and u.get("userType") == "Member"
        ]
        by_sam, disabled = synced[0], synced[1]
        t.set_user(disabled["id"], accountEnabled=False)
        machine_id = next(iter(t.machines))
        host = str(t.machines[machine_id]["computerDnsName"]).split(".")[0].upper()
        netbios = str(by_sam["onPremisesDomainName"]).split(".")[0].upper()
        upn = str(cloud[0]["userPrincipalName"])
        added = [
            logon(by_sam["onPremisesSamAccountName"], netbios, "S-1-5-21-1-2-3-99999"),
            logon(
                disabled["onPremisesSamAccountName"],
                netbios,
                disabled["onPremisesSecurityIdentifier"],
            ),
            logon(upn, "AzureAD", "S-1-12-1-1-2-3-4"),
            logon("helpdesk", host, "S-1-5-21-9-9-9-1001"),
            logon("Administrator", "WORKGROUP", "S-1-5-21-9-9-9-500"),
            logon("SYSTEM", "NT AUTHORITY", "S-1-5-18", "Service"),
            logon("ghost", netbios, "S-1-5-21-1-2-3-424242"),
            logon("stranger", "ELSEWHERE", "S-1-5-21-7-7-7-1234"),
        ]
        for lu in added:
            t.add_logon_user(machine_id, lu)
        graph = collect(env)
        key = "microsoft_defender_logon_user:{}".format
        kinds = {lu["id"]: entity(graph, key(lu["id"]))["accountKind"] for lu in added}
        assert kinds == {
            added[0]["id"]: "domain",
            added[1]["id"]: "domain",
            added[2]["id"]: "domain",
            added[3]["id"]: "local",
            added[4]["id"]: "local",
            added[5]["id"]: "service",
            added[6]["id"]: "unknown",
            added[7]["id"]: "unknown",
        }
        is_user = rels(graph, "microsoft_defender_logon_user_is_user")
        matched = {
            r["_fromEntityKey"]: (r["_toEntityKey"], r["matchedBy"]) for r in is_user.values()
        }
        user_key = "microsoft_defender_user:{}".format
        assert matched[key(added[0]["id"])] == (user_key(by_sam["id"]), "samAccountName")
        assert matched[key(added[1]["id"])] == (user_key(disabled["id"]), "sid")
        assert matched[key(added[2]["id"])] == (user_key(cloud[0]["id"]), "upn")
        states = {lu["id"]: entity(graph, key(lu["id"]))["directoryUserState"] for lu in added}
        assert states[added[1]["id"]] == "disabled"
        assert states[added[0]["id"]] == "enabled"
        assert states[added[6]["id"]] == "not_found"  # a directory domain, no such user
        assert states[added[7]["id"]] is None
        # every generated logon user of a synced member maps by SID
        generated = [
            e for e in graph.entities.values() if e["_type"] == "microsoft_defender_logon_user"
        ]
        assert sum(1 for e in generated if e["accountKind"] == "domain") >= len(generated) - 5


def write_hr_csv(path: Path, rows: list[tuple[str, str, str, str, str, str]]) -> None:
    lines = ["Email,Employee ID,Full name,Manager,Status,Terminated"]
    lines += [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


HR_COLUMNS = {
    "email": "Email",
    "employee_id": "Employee ID",
    "name": "Full name",
    "manager_email": "Manager",
    "status": "Status",
    "termination_date": "Terminated",
}


def test_employees_from_directory_and_hr_file_and_a_malformed_file(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    hr = tmp_path / "hr.csv"
    identity = {"hr_file": {"path": str(hr), "columns": HR_COLUMNS}}
    with identity_env(tmp_path, redis_url, redis_prefix, identity=identity) as env:
        members = [u for u in env.tenant.users.values() if u["userType"] == "Member"]
        boss, worker, leaver = members[0], members[1], members[2]
        write_hr_csv(
            hr,
            [
                (boss["userPrincipalName"], str(boss["employeeId"]), "The Boss", "", "Active", ""),
                (worker["userPrincipalName"].upper(), "", "W", boss["userPrincipalName"], "", ""),
                ("", str(leaver["employeeId"]), "L", "", "Terminated", "2024-05-01"),
                ("contractor@example.com", "C-1", "Contractor", "", "active", ""),
            ],
        )
        summary, _ = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        graph = collect(env)
        employees = {k: e for k, e in graph.entities.items() if e["_type"] == "employee"}
        directory_members = sum(1 for u in members if u.get("employeeId"))
        assert len(employees) == directory_members + 1  # + the HR-only contractor
        assert summary.counts["employee"] == len(employees)
        boss_key = f"employee:{boss['employeeId']}"
        assert employees[boss_key]["source"] == "directory+hr"
        # matched to its HR record by e-mail; keyed by the HR record's id (it has no employee id)
        worker_key = f"employee:{worker['userPrincipalName'].lower()}"
        assert employees[worker_key]["source"] == "directory+hr"
        manages = rels(graph, "employee_manages_employee")
        assert f"{boss_key}|manages|{worker_key}" in manages
        leaver_emp = employees[f"employee:{leaver['employeeId']}"]
        assert leaver_emp["status"] == "terminated" and leaver_emp["terminationOn"] == 1714521600000
        assert leaver_emp["directoryAccountEnabled"] == leaver["accountEnabled"]
        is_emp = rels(graph, "microsoft_defender_user_is_employee")
        how = {r["_fromEntityKey"]: r["matchedBy"] for r in is_emp.values()}
        assert how[f"microsoft_defender_user:{boss['id']}"] == "employee_id"
        guests = [u for u in graph.entities.values() if u.get("userType") == "Guest"]
        assert guests and all(u["employeeMapped"] is False for u in guests)

        # a malformed file: reported with file and line, previous employees kept, no deletions
        hr.write_text(hr.read_text() + 'broken,"unterminated\n')
        summary, events = env.sync()
        assert summary.status == "degraded"
        error = summary.scopes_incomplete["employees"] or ""
        assert f"{hr}:6" in error, error
        assert summary.counts["employee"] == len(employees)
        assert not of_type(events, "mde.employee.deleted")
        assert not of_type(events, "mde.logon_user.deleted")


def test_hr_json_errors_name_the_item_and_json_records_work(tmp_path: Path) -> None:
    from monitor.config import HrFile
    from monitor.model.employees import HrFileError, read_hr_file

    path = tmp_path / "people.json"
    path.write_text('{"employees": [{"email": "a@x.com", "status": "terminated"}, {"name": "n"}]}')
    try:
        read_hr_file(HrFile(path=path))
    except HrFileError as exc:
        assert f"{path}: item 1" in str(exc) and "neither" in str(exc)
    else:
        raise AssertionError("no error for an item without id or e-mail")
    path.write_text(
        '[{"email": "A@X.com", "status": "Terminated", "termination_date": "2024-01-02"}]'
    )
    (rec,) = read_hr_file(HrFile(path=path))
    assert rec.email == "a@x.com" and rec.terminated and rec.termination_on == 1704153600000
    path.write_text("[{")
    try:
        read_hr_file(HrFile(path=path))
    except HrFileError as exc:
        assert str(exc).startswith(f"{path}:1: invalid JSON")
    else:
        raise AssertionError("no error for invalid JSON")
    csv = tmp_path / "dup.csv"
    csv.write_text("email,employee_id\na@x.com,1\nb@x.com,1\n")
    try:
        read_hr_file(HrFile(path=csv))
    except HrFileError as exc:
        assert f"{csv}:3: duplicate employee id '1' (first on line 2)" in str(exc)
    else:
        raise AssertionError("no error for a duplicate employee id")


def test_users_incomplete_keeps_logon_users_and_employees(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    from monitor.simulator.faults import Fault

    with identity_env(tmp_path, redis_url, redis_prefix) as env:
        first, _ = env.sync()
        env.sim.add_fault(Fault("graph:/users/delta", status=500, retry_after=None))
        summary, events = env.sync()
        assert summary.status == "degraded"
        assert "employees" in summary.scopes_incomplete
        # the logon-user refresh is held, not fetched and thrown away: no budget spent
        assert env.graph_requests("defender:/api/machines/{id}/logonusers") == 0
        assert first.requests["requests"]["defender:/api/machines/{id}/logonusers"] > 0
        for typ in (
            "employee",
            "microsoft_defender_logon_user",
            "microsoft_defender_logon_user_is_user",
        ):
            assert summary.counts[typ] == first.counts[typ], typ
        assert [e["type"] for e in events if not e["type"].startswith("mde.sync.")] == []
        graph = collect(env)
        assert graph.scopes["employees"].state is ScopeState.FAILED


@pytest.mark.parametrize("delta", [False, True], ids=["list", "delta"])
def test_directory_managers_through_the_users_read(
    tmp_path: Path, redis_url: str, redis_prefix: str, delta: bool
) -> None:
    identity = {"directory_employees": {"managers": True}}
    options = {"users_delta": delta}
    with identity_env(
        tmp_path, redis_url, redis_prefix, identity=identity, tenant_options=options, users=150
    ) as env:
        summary, _ = env.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        if delta:  # $select=...,manager: manager@delta, 200 users a page
            assert env.graph_requests("graph:/users/delta") == 1
        else:
            assert env.graph_requests("graph:/users") == 2  # $expand caps Graph's pages at 100
        graph = collect(env)
        manages = rels(graph, "employee_manages_employee")
        d = env.tenant.directory
        users = env.tenant.users
        expected = {
            (f"employee:{users[boss]['employeeId']}", f"employee:{users[uid]['employeeId']}")
            for uid, boss in d.managers.items()
            if users[uid].get("employeeId") and users[boss].get("employeeId")
        }
        assert (
            expected
            and {(r["_fromEntityKey"], r["_toEntityKey"]) for r in manages.values()} == expected
        )
