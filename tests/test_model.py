"""Converters and GraphBuilder on the recorded Microsoft responses (no network, no Redis)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from monitor.config import TenantConfig
from monitor.model.builder import GraphBuilder
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.machines import format_mac, machine_ip_addresses, machine_mac_addresses
from monitor.model.raw import json_default
from monitor.model.schema import (
    _SHARED,
    ACCOUNT,
    ENTITY_BY_TYPE,
    MACHINE,
    RELATIONSHIP_BY_TYPE,
    SHARED_VALUES_PER_FIELD,
    TAG_ACCOUNT_NAME,
    USER,
    VULNERABILITY,
    epoch_ms,
    logon_users_scope,
)
from monitor.model.vulnerabilities import pairs_from_machine_vulnerabilities, vulnerability_entity

RECORDED = Path(__file__).resolve().parents[1] / "monitor" / "simulator" / "recorded"
VULN_MACHINE = "6dd3f7ce1291c2ccd7a1da22f0934bca93ee2e24"
VM1 = "241056b69203a660e7521c8c3bfc2476f8cf2ae0"
SONARQUBE = "5582c16c2b8866def83125320b1754481686f65b"
NO_INTERFACES = "7b14aeb07923dc786f6ff19ec58f879ae3416eac"
TENANT_ID = "19ae0f99-6fc6-444b-bd54-97504efc66ad"

ENTITY_BASE = {"_key", "_type", "_class", "_rawData", TAG_ACCOUNT_NAME}
RELATIONSHIP_BASE = {"_key", "_type", "_class", "_fromEntityKey", "_toEntityKey", "displayName"}


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def values(name: str) -> list[dict[str, Any]]:
    data = recorded(name)
    assert isinstance(data["value"], list)
    return data["value"]


def tenant(tag: bool = True) -> TenantConfig:
    return TenantConfig(
        name="contoso",
        description="Contoso production",
        tenant_id=TENANT_ID,
        client_id="11111111-1111-1111-1111-111111111111",
        client_secret=SecretStr("not-a-real-secret"),
        tag_with_account_name=tag,
    )


def machine_cves() -> list[dict[str, Any]]:
    return values(f"mde_machine_vulnerabilities_{VULN_MACHINE}.json")


def build(tag: bool = True, pairs: list[dict[str, Any]] | None = None) -> Graph:
    builder = GraphBuilder(tenant(tag))
    builder.add_account(values("graph_organization.json")[0])
    builder.add_users(values("graph_users.json"))
    builder.add_machines(values("mde_machines.json"))
    if pairs is None:
        pairs = pairs_from_machine_vulnerabilities(VULN_MACHINE, machine_cves())
    builder.add_machine_vulnerabilities(pairs, machine_cves())
    return builder.graph()


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build()


def test_recorded_counts(graph: Graph) -> None:
    counts = graph.count_by_type()
    assert counts == {
        "microsoft_defender_account": 1,
        "microsoft_defender_account_has_machine": 9,
        "microsoft_defender_account_has_user": 38,
        "microsoft_defender_machine": 9,
        "microsoft_defender_machine_identified_vulnerability": 51,
        "microsoft_defender_machine_manages_user_endpoint": 9,
        "microsoft_defender_user": 38,
        "microsoft_defender_vulnerability": 51,
        "microsoft_defender_vulnerability_is_cve": 51,
        "user_endpoint": 9,
    }
    exported = graph.export()
    assert len(exported["entities"]) == 1 + 38 + 9 + 9 + 51
    assert len(exported["relationships"]) == 9 + 38 + 9 + 51
    assert len(exported["mappedRelationships"]) == 51


def test_items_are_json_and_match_the_declared_properties(graph: Graph) -> None:
    for entity in graph.entities.values():
        declared = ENTITY_BY_TYPE[entity["_type"]]
        # every written property is declared; unknown values are left out, never null
        assert set(entity) - ENTITY_BASE <= set(declared.properties), entity["_type"]
        assert {"name", "displayName", "id", *declared.keep_null} <= set(entity)
        assert all(v is not None or k in declared.keep_null for k, v in entity.items()), entity[
            "_type"
        ]
        assert entity["_class"] == list(declared.classes)
        assert entity["_rawData"][0]["name"] == "default"
        assert isinstance(entity["displayName"], str) and entity["displayName"]
    for rel in graph.relationships.values():
        declared_rel = RELATIONSHIP_BY_TYPE[rel["_type"]]
        assert rel["displayName"] == rel["_class"] == declared_rel.rel_class
        if "_mapping" not in rel:
            assert set(rel) - RELATIONSHIP_BASE <= set(getattr(declared_rel, "properties", ()))
            assert all(isinstance(v, str | int | float | bool) for v in rel.values())
            assert rel["_fromEntityKey"] in graph.entities
            assert rel["_toEntityKey"] in graph.entities
    orjson.dumps(graph.export())  # no datetime or other non-JSON values anywhere


def test_account(graph: Graph) -> None:
    account = graph.entities[ACCOUNT.key(TENANT_ID)]
    assert account["_key"] == f"microsoft_defender_account:{TENANT_ID}"
    # JupiterOne's converter: the organization's display name, vendor "Microsoft Defender"
    assert account["name"] == account["displayName"] == "JupiterOne Azure Integration Development"
    assert account["organizationName"] == "JupiterOne Azure Integration Development"
    assert account["vendor"] == "Microsoft Defender"
    assert account["id"] == TENANT_ID
    assert account["defaultDomain"] == "j1AzureIntegrationDev.onmicrosoft.com"
    assert account["verifiedDomains"] == ["j1AzureIntegrationDev.onmicrosoft.com"]
    assert account["countryLetterCode"] == "US"
    assert account["tenantType"] == "AAD"
    assert account["createdOn"] == 1630508344000  # 2021-09-01T14:59:04Z
    assert account["description"] == "Contoso production"
    assert graph.scope_of[account["_key"]] == "account"


def test_machine_properties(graph: Graph) -> None:
    vm1 = graph.entities[MACHINE.key(VM1)]
    raw = next(m for m in values("mde_machines.json") if m["id"] == VM1)
    assert vm1["name"] == vm1["displayName"] == raw["computerDnsName"]
    assert vm1["riskScore"] == "None"
    assert vm1["healthStatus"] == "Inactive"
    assert vm1["exposureLevel"] == "Low"
    assert vm1["osPlatform"] == "Ubuntu"
    assert vm1["lastExternalIpAddress"] == "172.203.230.54"
    assert vm1["ipAddress"] == ["10.6.0.6", "fe80::20d:3aff:fe9a:bb3a"]  # no 127.0.0.1 / ::1
    assert vm1["macAddress"] == ["00:0D:3A:9A:BB:3A"]  # all-zero loopback MAC dropped
    assert vm1["firstSeenOn"] == vm1["lastSeenOn"] == 1706208356688  # ...56.688814Z
    assert "endpoint-protection" in vm1["function"]
    assert vm1["_rawData"][0]["rawData"] == raw
    sonar = graph.entities[MACHINE.key(SONARQUBE)]
    assert sonar["macAddress"] == ["02:42:F5:BB:D0:85", "02:D9:FC:17:FF:1E", "42:01:0A:80:0F:DB"]
    assert "127.0.0.1" not in sonar["ipAddress"] and "::1" not in sonar["ipAddress"]
    bare = graph.entities[MACHINE.key(NO_INTERFACES)]
    assert bare["ipAddress"] == [] and bare["macAddress"] == []


def test_device_and_machine_relationships(graph: Graph) -> None:
    device = graph.entities[f"user_endpoint.{VM1}"]
    assert device["_class"] == ["Device"]
    assert device["category"] == "endpoint"
    assert device["deviceId"] == device["id"] == VM1
    assert device["hostname"] == device["fqdn"] == device["computerDnsName"]
    assert device["vmId"] == "2ca81940-456f-4e56-b80a-68b4f3d3da23"
    assert device["cloudProvider"] == "Azure"
    assert device["subscriptionId"] == "193f89dc-6225-4a80-bacb-96b32fbf6dd0"
    assert device["ipAddresses"] == ["10.6.0.6", "fe80::20d:3aff:fe9a:bb3a", "127.0.0.1", "::1"]
    assert device["make"] is None and device["model"] is None and device["serial"] is None
    machine_key, account_key = MACHINE.key(VM1), ACCOUNT.key(TENANT_ID)
    manages = graph.relationships[f"{machine_key}|manages|{device['_key']}"]
    assert manages["_type"] == "microsoft_defender_machine_manages_user_endpoint"
    assert (manages["_fromEntityKey"], manages["_toEntityKey"]) == (machine_key, device["_key"])
    has = graph.relationships[f"{account_key}|has|{machine_key}"]
    assert has["_type"] == "microsoft_defender_account_has_machine"
    assert graph.scope_of[has["_key"]] == graph.scope_of[device["_key"]] == "machines"


def test_machine_without_dns_name_is_named_after_its_manager() -> None:
    builder = GraphBuilder(tenant())
    builder.add_machines([{"id": "m1", "computerDnsName": None, "managedBy": "Intune"}])
    builder.add_machines([{"id": "m2", "computerDnsName": "", "managedBy": None}])
    g = builder.graph()
    assert g.entities[MACHINE.key("m1")]["displayName"] == "Intune's Device"
    assert g.entities[MACHINE.key("m2")]["name"] == "Unknown User's Device"
    assert g.entities["user_endpoint.m2"]["name"] == "Unknown User's Device"
    assert builder.count("machines") == 2


def test_mac_rule() -> None:
    assert format_mac("001B44113AB7") == "00:1B:44:11:3A:B7"
    assert format_mac("00-1b-44-11-3a-b7") == "00:1B:44:11:3A:B7"
    assert format_mac("00:1b:44:11:3a:b7") == "00:1B:44:11:3A:B7"
    assert format_mac("000000000000") is None
    assert format_mac("00:00:00:00:00:00") is None
    assert format_mac("not-a-mac") is None
    assert format_mac(None) is None
    machine = {
        "id": "m",
        "ipAddresses": [
            {"ipAddress": "10.0.0.5", "macAddress": "AABBCCDDEE01", "operationalStatus": "Up"},
            {"ipAddress": "10.0.0.6", "macAddress": "AABBCCDDEE02", "operationalStatus": "Down"},
            {
                "ipAddress": "10.0.0.7",
                "macAddress": "AABBCCDDEE03",
                "operationalStatus": "Up",
                "type": "SoftwareLoopback",
            },
            {"ipAddress": "127.0.0.2", "macAddress": "AABBCCDDEE04", "operationalStatus": "Up"},
            {"ipAddress": "10.0.0.8", "macAddress": "000000000000", "operationalStatus": "Up"},
            {
                "ipAddress": "fe80::1%3",
                "macAddress": "aa-bb-cc-dd-ee-01",
                "operationalStatus": "Up",
            },
            {"ipAddress": "10.0.0.5", "macAddress": "AABBCCDDEE01", "operationalStatus": "Up"},
        ],
    }
    assert machine_mac_addresses(machine) == ["AA:BB:CC:DD:EE:01"]
    # Unknown / null status and null type are real interfaces (JupiterOne's recordings have
    # them); only explicit non-up states, loopback and all-zero MACs are left out
    kept_and_dropped = {
        "id": "m",
        "ipAddresses": [
            {"ipAddress": "10.1.0.1", "macAddress": "0A0000000001", "operationalStatus": "Unknown"},
            {"ipAddress": "10.1.0.2", "macAddress": "0A0000000002", "operationalStatus": None},
            {"ipAddress": "10.1.0.3", "macAddress": "0A0000000003", "type": None},
            {"ipAddress": "10.1.0.4", "macAddress": "0A0000000004", "operationalStatus": "up"},
            *(
                {
                    "ipAddress": "10.1.1.1",
                    "macAddress": "0B000000000" + str(n),
                    "operationalStatus": s,
                }
                for n, s in enumerate(
                    ("Down", "Testing", "Dormant", "NotPresent", "LowerLayerDown")
                )
            ),
            {"ipAddress": "10.1.0.9", "macAddress": "00:00:00:00:00:00", "operationalStatus": None},
            {"ipAddress": "127.0.0.1", "macAddress": "0C0000000001", "operationalStatus": None},
            {"ipAddress": "10.1.0.8", "macAddress": "0C0000000002", "type": "SoftwareLoopback"},
        ],
    }
    assert machine_mac_addresses(kept_and_dropped) == [
        "0A:00:00:00:00:01",
        "0A:00:00:00:00:02",
        "0A:00:00:00:00:03",
        "0A:00:00:00:00:04",
    ]
    # IPs: every interface, whatever its status, except loopback; distinct and sorted
    assert machine_ip_addresses(machine) == [
        "10.0.0.5",
        "10.0.0.6",
        "10.0.0.7",
        "10.0.0.8",
        "fe80::1%3",
    ]


def test_users(graph: Graph) -> None:
    raw = values("graph_users.json")
    alex = graph.entities[USER.key("eaca2822-9c62-4244-9c01-1818b5c4f98e")]
    assert alex["displayName"] == alex["name"] == "Alex Adler"
    assert alex["username"] == alex["userPrincipalName"] == raw[0]["userPrincipalName"]
    assert "email" not in alex and "mail" not in alex
    assert "active" not in alex  # the recording has no accountEnabled: unknown, not True
    # the recording has no phones and no language: left out, not [] or null
    assert raw[0]["businessPhones"] == [] and raw[0]["preferredLanguage"] is None
    assert not {"businessPhones", "mobilePhone", "preferredLanguage"} & set(alex)
    blake = graph.entities[USER.key("bc6ef7fc-212e-4e35-a26c-a50460cfc266")]
    assert blake["email"] == "blake.hale@example.com"
    rel = graph.relationships[f"{ACCOUNT.key(TENANT_ID)}|has|{alex['_key']}"]
    assert rel["_type"] == "microsoft_defender_account_has_user"
    assert graph.scope_of[alex["_key"]] == graph.scope_of[rel["_key"]] == "users"


def test_user_active_follows_account_enabled() -> None:
    builder = GraphBuilder(tenant())
    n = builder.add_users(
        [
            {
                "id": "u1",
                "displayName": None,
                "userPrincipalName": "u1@contoso.com",
                "accountEnabled": False,
                "createdDateTime": "2024-01-02T03:04:05Z",
                "userType": "Member",
            },
            {
                "id": "u2",
                "displayName": "Two",
                "accountEnabled": True,
                "businessPhones": ["+1 425 555 0100", ""],
                "mobilePhone": "+1 206 555 0199",
                "preferredLanguage": "en-US",
            },
        ]
    )
    assert n == 2
    g = builder.graph()
    u1, u2 = g.entities[USER.key("u1")], g.entities[USER.key("u2")]
    assert u1["active"] is False and u1["accountEnabled"] is False
    assert u1["name"] == u1["displayName"] == "u1@contoso.com"  # no displayName: the UPN
    assert u1["createdOn"] == 1704164645000
    assert u1["userType"] == "Member"
    assert u2["active"] is True
    assert u2["businessPhones"] == ["+1 425 555 0100"]
    assert (u2["mobilePhone"], u2["preferredLanguage"]) == ("+1 206 555 0199", "en-US")


def test_vulnerabilities(graph: Graph) -> None:
    v = graph.entities[VULNERABILITY.key("CVE-2023-5517")]
    assert v["name"] == v["displayName"] == v["id"] == "CVE-2023-5517"
    assert v["severity"] == "High"
    assert v["score"] == v["numericSeverity"] == 7.5
    assert v["publishedOn"] == 1707782400000  # 2024-02-13T00:00:00Z
    assert v["updatedOn"] == 1709522106577  # 2024-03-04T03:15:06.577Z
    assert v["firstDetectedOn"] == 1707918666000  # 2024-02-14T13:51:06Z
    assert v["public"] is False and v["open"] is True
    assert v["exposedMachines"] == 1
    assert v["exploitTypes"] == ["Remote"] and v["references"] == []
    assert (v["category"], v["blocking"], v["production"]) == ("", False, False)
    assert v["webLink"] == "https://nvd.nist.gov/vuln/detail/CVE-2023-5517"
    assert graph.entities[VULNERABILITY.key("CVE-2023-44487")]["public"] is True
    no_date = graph.entities[VULNERABILITY.key("CVE-2023-4911")]  # 0001-01-01T00:00:00Z
    assert "publishedOn" not in no_date and "updatedOn" not in no_date

    mapped = graph.relationships[f"{v['_key']}|is|FORWARD:_type=cve:_key=cve-2023-5517"]
    assert mapped["_type"] == "microsoft_defender_vulnerability_is_cve"
    assert mapped["_class"] == mapped["displayName"] == "IS"
    assert mapped["_mapping"] == {
        "sourceEntityKey": v["_key"],
        "relationshipDirection": "FORWARD",
        "targetFilterKeys": [["_type", "_key"]],
        "skipTargetCreation": False,
        "targetEntity": {
            "_type": "cve",
            "_key": "cve-2023-5517",
            "id": "CVE-2023-5517",
            "name": "CVE-2023-5517",
            "displayName": "CVE-2023-5517",
            "score": 7.5,
            "references": ["https://nvd.nist.gov/vuln/detail/CVE-2023-5517"],
            "webLink": "https://nvd.nist.gov/vuln/detail/CVE-2023-5517",
        },
    }
    identified = graph.relationships[f"{MACHINE.key(VULN_MACHINE)}|identified|{v['_key']}"]
    assert identified["_type"] == "microsoft_defender_machine_identified_vulnerability"
    assert "products" not in identified and "fixingKbIds" not in identified
    assert graph.scope_of[identified["_key"]] == "vulnerabilities"


def pair(machine: str, cve: str, vendor: str, product: str, version: str, **kw: Any) -> dict:
    return {
        "id": f"{machine}_{cve}_{vendor}_{product}_{version}",
        "cveId": cve,
        "machineId": machine,
        "fixingKbId": kw.get("kb"),
        "productName": product,
        "productVendor": vendor,
        "productVersion": version,
        "severity": kw.get("severity", "High"),
    }


def test_two_products_of_one_pair_give_one_relationship() -> None:
    builder = GraphBuilder(tenant())
    cve = next(c for c in machine_cves() if c["id"] == "CVE-2023-28322")
    pairs = [
        pair("m1", "CVE-2023-28322", "ubuntu", "libcurl4", "7.58.0", kb="KB2"),
        pair("m1", "CVE-2023-28322", "ubuntu", "curl", "7.58.0", kb="KB1"),
        pair("m2", "CVE-2023-28322", "haxx", "curl", "8.0.1"),
    ]
    assert builder.add_machine_vulnerabilities(pairs, [cve]) == 1
    g = builder.graph()
    vkey = VULNERABILITY.key("CVE-2023-28322")
    rels = [r for r in g.relationships.values() if r.get("_toEntityKey") == vkey]
    assert len(rels) == 2  # m1 and m2, not one per product
    m1 = g.relationships[f"{MACHINE.key('m1')}|identified|{vkey}"]
    assert m1["products"] == "ubuntu curl 7.58.0, ubuntu libcurl4 7.58.0"  # scalars only
    assert m1["fixingKbIds"] == "KB1, KB2"
    assert g.entities[vkey]["severity"] == "Low"  # the CVE details win over the pair's severity
    # a second call (e.g. per machine) merges into the same relationship
    more = [pair("m1", "CVE-2023-28322", "ubuntu", "curl", "7.58.0", kb="KB3")]
    assert builder.add_machine_vulnerabilities(more, []) == 0
    m1 = g.relationships[f"{MACHINE.key('m1')}|identified|{vkey}"]
    assert m1["products"] == "ubuntu curl 7.58.0, ubuntu libcurl4 7.58.0"
    assert m1["fixingKbIds"] == "KB1, KB2, KB3"
    assert g.entities[vkey]["severity"] == "Low"  # still the detailed entity


def test_cve_missing_from_catalogue_comes_from_the_pairs() -> None:
    builder = GraphBuilder(tenant())
    pairs = [
        pair("m1", "CVE-2099-0001", "v", "p", "1", severity="Medium"),
        pair("m2", "CVE-2099-0001", "v", "p", "1", severity="Critical"),
        pair("m3", "TVM-2020-0002", "v", "p", "1", severity="Low"),
    ]
    assert builder.add_machine_vulnerabilities(pairs, []) == 2
    g = builder.graph()
    v = g.entities[VULNERABILITY.key("CVE-2099-0001")]
    assert v["severity"] == "Critical"
    assert v["open"] is True and "score" not in v and "description" not in v
    assert v["_rawData"][0]["rawData"] == {"id": "CVE-2099-0001", "severity": "Critical"}
    tvm = g.entities[VULNERABILITY.key("TVM-2020-0002")]
    assert "webLink" not in tvm
    mapped = [r for r in g.relationships.values() if "_mapping" in r]
    assert [r["_mapping"]["targetEntity"]["_key"] for r in mapped] == ["cve-2099-0001"]
    # a later call with the catalogue entry replaces the pair-only entity
    full = {**machine_cves()[0], "id": "CVE-2099-0001", "name": "CVE-2099-0001"}
    assert builder.add_machine_vulnerabilities([], [full]) == 0
    assert g.entities[VULNERABILITY.key("CVE-2099-0001")]["score"] == full["cvssV3"]


def test_tag_account_name_on_and_off(graph: Graph) -> None:
    assert all(e[TAG_ACCOUNT_NAME] == "contoso" for e in graph.entities.values())
    assert all(TAG_ACCOUNT_NAME not in r for r in graph.relationships.values())
    untagged = build(tag=False)
    assert all(TAG_ACCOUNT_NAME not in e for e in untagged.entities.values())


def test_same_input_gives_identical_json() -> None:
    pairs = pairs_from_machine_vulnerabilities(VULN_MACHINE, machine_cves())
    first = orjson.dumps(build(pairs=pairs).export())
    assert orjson.dumps(build(pairs=list(pairs)).export()) == first
    shuffled = list(pairs)
    random.Random(7).shuffle(shuffled)
    assert orjson.dumps(build(pairs=shuffled).export()) == first


def test_logon_users_one_entity_per_account() -> None:
    alice_a = {
        "id": "contoso\\alice",
        "accountName": "alice",
        "accountDomain": "contoso",
        "accountSid": "S-1-5-21-1",
        "firstSeen": "2024-01-10T00:00:00Z",
        "lastSeen": "2024-03-01T00:00:00Z",
        "mostPrevalentMachineId": "m-b",
        "leastPrevalentMachineId": "m-a",
        "logonTypes": "Interactive",
        "logOnMachinesCount": 2,
        "isDomainAdmin": True,
        "isOnlyNetworkUser": False,
    }
    alice_b = {**alice_a, "firstSeen": "2024-01-05T00:00:00Z", "lastSeen": "2024-02-01T00:00:00Z"}
    bob = {**alice_a, "id": "contoso\\bob", "accountName": "bob", "isDomainAdmin": False}

    def run(order: list[str]) -> tuple[GraphBuilder, bytes]:
        builder = GraphBuilder(tenant())
        reports = {"m-a": [alice_a, bob], "m-b": [alice_b]}
        for machine_id in order:
            builder.add_logon_users(machine_id, reports[machine_id])
        g = builder.graph()
        body = orjson.dumps(
            [g.entities, dict(g.relationships), dict(g.scope_of)],
            option=orjson.OPT_SORT_KEYS,
            default=json_default,
        )
        return builder, body

    builder, forward = run(["m-a", "m-b"])
    assert run(["m-b", "m-a"])[1] == forward  # fetch order does not matter
    g = builder.graph()
    alice = g.entities["microsoft_defender_logon_user:contoso\\alice"]
    assert alice["name"] == alice["username"] == alice["displayName"] == "alice"
    assert alice["domain"] == "contoso" and alice["accountSid"] == "S-1-5-21-1"
    assert alice["firstSeenOn"] == 1704412800000  # earliest: 2024-01-05 (m-b)
    assert alice["lastSeenOn"] == 1709251200000  # latest: 2024-03-01 (m-a)
    assert alice["isDomainAdmin"] is True and alice["active"] is True
    assert alice["logOnMachinesCount"] == 2
    assert g.scope_of[alice["_key"]] == logon_users_scope("m-a")
    has = [r for r in g.relationships.values() if r.get("_toEntityKey") == alice["_key"]]
    assert sorted(r["_fromEntityKey"] for r in has) == [MACHINE.key("m-a"), MACHINE.key("m-b")]
    assert {g.scope_of[r["_key"]] for r in has} == {"logon_users:m-a", "logon_users:m-b"}
    assert has[0]["_type"] == "microsoft_defender_machine_has_logon_user"
    assert builder.count("logon_users:m-a") == 2


def test_scopes_and_account_key_before_the_account() -> None:
    builder = GraphBuilder(tenant())
    assert builder.account_key == ACCOUNT.key(TENANT_ID)
    builder.add_users([{"id": "u1", "displayName": "One"}])
    status = ScopeStatus(ScopeState.FAILED, error="GET /v1.0/organization: 403")
    builder.set_scope("account", status)
    builder.set_scope("users", ScopeStatus(ScopeState.COMPLETE, count=builder.count("users")))
    g = builder.graph()
    assert g is builder.graph()
    rel = next(iter(g.relationships.values()))
    assert rel["_fromEntityKey"] == builder.account_key
    assert g.scopes["account"] is status
    assert g.scopes["users"].count == 1


def test_account_without_organization() -> None:
    builder = GraphBuilder(tenant())
    builder.add_account(None)
    account = builder.graph().entities[builder.account_key]
    assert account["name"] == "contoso" and "organizationName" not in account
    assert account["vendor"] == "Microsoft Defender"
    assert account["_rawData"] == [{"name": "default", "rawData": None}]


@pytest.mark.parametrize(
    ("call", "scope", "message"),
    [
        (
            lambda b: b.add_machines([{"id": "m1"}, {"computerDnsName": "x"}]),
            "machines",
            "machines item 1: machine: field 'id' must be a non-empty string (missing)",
        ),
        (lambda b: b.add_users(["not an object"]), "users", "users item 0: expected a JSON"),
        (
            lambda b: b.add_machines([{"id": "m", "ipAddresses": "10.0.0.1"}]),
            "machines",
            "machines item 0: machine: field 'ipAddresses' must be a list",
        ),
        (
            lambda b: b.add_logon_users("m1", [{"accountName": "x"}]),
            "logon_users:m1",
            "logonusers item 0: logon user: field 'id'",
        ),
        (
            lambda b: b.add_machine_vulnerabilities([{"cveId": "CVE-2024-1"}], []),
            "vulnerabilities",
            "machinesVulnerabilities item 0: machine vulnerability: field 'machineId'",
        ),
        (
            lambda b: b.add_machine_vulnerabilities([], [{"name": "no id"}]),
            "vulnerabilities",
            "vulnerabilities item 0: vulnerability: field 'id'",
        ),
        (
            lambda b: b.add_account({"verifiedDomains": "x"}),
            "account",
            "organization item 0: organization: field 'verifiedDomains' must be a list",
        ),
    ],
)
def test_bad_item_is_rejected_named_and_degrades_its_scope(
    call: Any, scope: str, message: str
) -> None:
    builder = GraphBuilder(tenant())
    call(builder)  # never raises: the bad item is left out
    [rejected] = builder.rejected
    assert rejected.scope == scope and str(rejected).startswith(message)
    builder.set_scope(scope, ScopeStatus(ScopeState.COMPLETE, count=0))
    status = builder.graph().scopes[scope]
    assert status.state is ScopeState.FAILED  # never complete: nothing is deleted
    assert status.error is not None and message in status.error
    assert "previous data kept" in status.error
    builder.set_scope("other", ScopeStatus(ScopeState.COMPLETE))
    assert builder.graph().scopes["other"].state is ScopeState.COMPLETE


def test_good_items_beside_a_bad_one_are_kept() -> None:
    builder = GraphBuilder(tenant())
    machines = values("mde_machines.json")
    assert builder.add_machines([machines[0], {"computerDnsName": "no id"}, machines[1]]) == 2
    assert MACHINE.key(machines[1]["id"]) in builder.graph().entities
    assert [(r.resource, r.index) for r in builder.rejected] == [("machines", 1)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-02-13T00:00:00Z", 1707782400000),
        ("2024-01-25T18:45:56.688814Z", 1706208356688),
        ("2024-01-25T18:45:56.6888143Z", 1706208356688),  # .NET 7-digit fraction
        ("2024-01-25T18:45:56.5Z", 1706208356500),
        ("2024-01-25T18:45:56", 1706208356000),  # no zone: UTC
        ("2024-01-25T20:45:56+02:00", 1706208356000),
        ("2024-01-25T13:45:56-0500", 1706208356000),
        ("1969-12-31T23:59:59.900Z", -100),
        ("0001-01-01T00:00:00Z", None),
        ("yesterday", None),
        ("2024-02-30T00:00:00Z", None),
        (None, None),
        (1707782400000, None),
    ],
)
def test_epoch_ms(text: object, expected: int | None) -> None:
    assert epoch_ms(text) == expected


def test_vulnerability_maps_epss_when_defender_sends_it() -> None:
    cve = {**machine_cves()[0], "epss": 0.00123}
    assert vulnerability_entity(cve)["epss"] == 0.00123
    assert "epss" not in vulnerability_entity({**cve, "epss": None})
    assert "epss" not in vulnerability_entity({**cve, "epss": "high"})  # not a number: left out


def test_few_valued_properties_share_one_string_per_value() -> None:
    """Users parsed from separate JSON hold one object per department, not one each; a
    property seen with more than SHARED_VALUES_PER_FIELD values (a UPN) stops being tracked;
    every value reads back as given either way."""
    many = SHARED_VALUES_PER_FIELD + 5

    def user(i: int) -> dict[str, Any]:
        doc = {"id": f"share-{i}", "userPrincipalName": f"share{i}@contoso.com"}
        doc["department"] = "Shared Finance" if i % 2 else "Shared Sales"
        return dict(orjson.loads(orjson.dumps(doc)))  # its own strings, as a page gives them

    builder = GraphBuilder(tenant())
    assert builder.add_users([user(i) for i in range(many)]) == many
    users = [builder.graph().entities[USER.key(f"share-{i}")] for i in range(many)]
    finance = [u["department"] for u in users[1::2]]
    assert finance == ["Shared Finance"] * len(finance)
    assert len({id(v) for v in finance}) == 1  # one object for all of them
    assert [u["userPrincipalName"] for u in users] == [f"share{i}@contoso.com" for i in range(many)]
    tables = _SHARED[USER.type]
    assert tables["userPrincipalName"] is None  # too many values: no longer tracked
    department = tables["department"]
    assert department is not None and "Shared Sales" in department
