"""Model fidelity through the real collection path (simulator over HTTPS): what real tenants send
and what JupiterOne's converters write - MACs of Unknown/null interfaces, users' phones and
language via `$select`, the account's name and vendor, `epss`."""

from __future__ import annotations

from pathlib import Path

import yaml

from monitor.collect.collector import collect_tenant
from monitor.config import parse_settings
from monitor.model.graph import ScopeState
from monitor.model.users import GRAPH_USER_FIELDS
from monitor.simulator import Simulator, generate_tenant


def test_collected_entities_carry_what_real_tenants_send(tmp_path: Path) -> None:
    tenant = generate_tenant(
        machines=6, users=12, vulns_per_machine=2, cves=6, logon_users_per_machine=0, seed=21
    )
    machine_id = next(iter(tenant.machines))
    # as in JupiterOne's recordings of a real tenant: an interface in state Unknown with a null
    # type, one with no status at all, next to one that is Down and the loopback
    tenant.set_machine(
        machine_id,
        ipAddresses=[
            {"ipAddress": "10.9.0.1", "macAddress": "00155D0A0B01", "type": None,
             "operationalStatus": "Unknown"},
            {"ipAddress": "10.9.0.2", "macAddress": "00155D0A0B02", "type": None,
             "operationalStatus": None},
            {"ipAddress": "10.9.0.3", "macAddress": "00155D0A0B03", "type": "Tunnel",
             "operationalStatus": "Down"},
            {"ipAddress": "127.0.0.1", "macAddress": "000000000000", "type": "SoftwareLoopback",
             "operationalStatus": "Up"},
        ],
    )  # fmt: skip
    user_id = next(iter(tenant.users))
    tenant.set_user(
        user_id,
        businessPhones=["+1 425 555 0111"],
        mobilePhone="+1 206 555 0122",
        preferredLanguage="fr-FR",
    )
    cve_id = next(c for cves in tenant.machine_vulns.values() for c in cves)
    tenant.set_cve(cve_id, epss=0.04213)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        settings = parse_settings(yaml.safe_load(sim.config_yaml()), "test")
        result = collect_tenant(settings, settings.tenants[0])
        requests = sim.counts(tenant.tenant_id)
    graph = result.graph
    assert graph is not None
    assert all(s.state is ScopeState.COMPLETE for s in graph.scopes.values()), graph.scopes
    assert requests  # the data came over HTTPS from the simulator

    macs = ["00:15:5D:0A:0B:01", "00:15:5D:0A:0B:02"]
    assert graph.entities[f"microsoft_defender_machine:{machine_id}"]["macAddress"] == macs
    assert graph.entities[f"user_endpoint.{machine_id}"]["macAddress"] == macs

    assert {"businessPhones", "mobilePhone", "preferredLanguage"} <= set(GRAPH_USER_FIELDS)
    user = graph.entities[f"microsoft_defender_user:{user_id}"]
    assert user["businessPhones"] == ["+1 425 555 0111"]
    assert (user["mobilePhone"], user["preferredLanguage"]) == ("+1 206 555 0122", "fr-FR")

    account = graph.entities[f"microsoft_defender_account:{tenant.tenant_id}"]
    assert account["name"] == account["displayName"] == tenant.organization["displayName"]
    assert account["name"] != settings.tenants[0].name
    assert account["vendor"] == "Microsoft Defender"

    vulnerability = graph.entities[f"microsoft_defender_vulnerability:{cve_id}"]
    assert vulnerability["epss"] == 0.04213
