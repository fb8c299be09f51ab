"""A fake Microsoft cloud over real HTTPS: Entra token, Graph and Defender.

    from monitor.simulator import Simulator, generate_tenant, load_recorded_tenant

    with Simulator([load_recorded_tenant()], state_dir) as sim:
        settings = parse_settings(yaml.safe_load(sim.config_yaml()), "sim")
        ...                      # talk to sim.authority_url / graph_url / defender_url
        sim.counts()             # {"defender:/api/machines": 1, "login:/token": 2, ...}

Endpoint keys (counts, faults): login:/token, login:/openid-configuration,
login:/common/discovery/instance, graph:/organization, graph:/users, graph:/users/{id},
graph:/users/delta, graph:/groups/delta, graph:/directoryRoles, graph:/directoryRoles/{id}/members,
defender:/api/machines, defender:/api/machines/{id}, defender:/api/machines/{id}/logonusers,
defender:/api/machines/{id}/vulnerabilities, defender:/api/vulnerabilities,
defender:/api/vulnerabilities/{id}, defender:/api/vulnerabilities/machinesVulnerabilities,
defender:/api/advancedqueries/run (and <api>:unknown for anything else). Fault kinds are described in `faults.py`, the admin
HTTP API in `admin.py`.

Roles are checked against both the token's `roles` claim and the tenant's current roles, so
`tenant.set_roles(...)` takes effect at once. Tokens carry the roles of their API only.
Tenants hold the seed's permissions; AdvancedQuery.Read.All (advanced hunting, see
`hunting.py`) is granted only when asked for, as customers opt in to it.

What real tenants do is played on demand: `tenant.set_behaviour(...)` (short Defender pages with
or without a nextLink, links to another host, @odata.count, lists missing their tail, Microsoft's
whole CVE catalogue), faults with an error `code`/`message` or no body, and
`sim.defender_resource` (the Defender API known by an app ID URI only, as in GCC High).
`/logonusers` of a device that is not onboarded answers 404.
"""

from monitor.simulator.admin import AdminError, SimulatorAdminClient
from monitor.simulator.faults import Fault
from monitor.simulator.generate import generate_tenant
from monitor.simulator.recorded import load_recorded_tenant
from monitor.simulator.simulator import Simulator
from monitor.simulator.tenant import ALL_ROLES, MUTATION_OPS, SimTenant

__all__ = [
    "ALL_ROLES",
    "MUTATION_OPS",
    "AdminError",
    "Fault",
    "SimTenant",
    "Simulator",
    "SimulatorAdminClient",
    "generate_tenant",
    "load_recorded_tenant",
]
