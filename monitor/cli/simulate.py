"""`mde-monitor simulate`: run the fake Microsoft cloud in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.table import Table

from monitor.cli.app import ExitCode, app, console, json_option, out, print_json

SMALL_TENANT = {"machines": 25, "users": 50, "vulns_per_machine": 8, "cves": 200}


@app.command()
def simulate(
    recorded: bool = typer.Option(
        False, "--recorded", help="Serve the recorded tenant (38 users, 9 machines, 51 CVEs)."
    ),
    machines: int | None = typer.Option(None, "--machines", min=0, help="Machines per tenant."),
    users: int | None = typer.Option(None, "--users", min=0, help="Users per tenant."),
    vulns_per_machine: int | None = typer.Option(
        None, "--vulns-per-machine", min=0, help="CVEs on each machine."
    ),
    cves: int | None = typer.Option(None, "--cves", min=0, help="CVEs in the catalogue."),
    logon_users: int = typer.Option(
        3, "--logon-users-per-machine", min=0, help="Logon accounts per machine."
    ),
    seed: int = typer.Option(42, "--seed", help="Generator seed (tenant i uses seed + i)."),
    tenants: int = typer.Option(1, "--tenants", min=1, help="Number of generated tenants."),
    state_dir: Path = typer.Option(
        Path(".data/simulator"), "--state-dir", help="CA, certificates and the written config."
    ),
    config_out: Path | None = typer.Option(
        None,
        "--config-out",
        help="Where to write the monitor config (default: STATE_DIR/config.yaml).",
    ),
    token_lifetime: int = typer.Option(
        3599, "--token-lifetime", min=1, help="Access token lifetime in seconds."
    ),
    graph_short_pages: bool = typer.Option(
        False, "--graph-short-pages", help="Serve Graph pages shorter than $top (with nextLink)."
    ),
    rate_limits: bool = typer.Option(
        False, "--rate-limits", help="Enforce Defender's 100/min, 1500/h limits."
    ),
    base_port: int = typer.Option(
        0,
        "--base-port",
        min=0,
        max=65532,
        help="Listen on BASE..BASE+3 (login, graph, defender, admin); 0 = ephemeral ports.",
    ),
    as_json: bool = json_option("Print the URLs and paths as JSON."),
) -> None:
    """Start the Entra ID / Graph / Defender simulator on 127.0.0.1 and serve until Ctrl-C.

    Prints the four URLs, the CA path and the written config file (which holds the client
    secrets; they are never printed). Point the monitor at it: `mde-monitor -c <config> ...`.
    """
    from monitor.simulator import Simulator, generate_tenant, load_recorded_tenant

    sizes_given = any(v is not None for v in (machines, users, vulns_per_machine, cves))
    if recorded and (sizes_given or tenants != 1):
        console.print("[red]usage[/red]: --recorded serves exactly one tenant and takes no sizes")
        raise typer.Exit(ExitCode.USAGE)
    if recorded:
        sim_tenants = [load_recorded_tenant()]
    else:
        n_machines = machines if machines is not None else SMALL_TENANT["machines"]
        n_users = users if users is not None else SMALL_TENANT["users"]
        n_vulns = (
            vulns_per_machine
            if vulns_per_machine is not None
            else SMALL_TENANT["vulns_per_machine"]
        )
        n_cves = cves if cves is not None else SMALL_TENANT["cves"]
        with console.status("generating tenants..."):
            sim_tenants = [
                generate_tenant(
                    machines=n_machines,
                    users=n_users,
                    vulns_per_machine=n_vulns,
                    cves=n_cves,
                    logon_users_per_machine=logon_users,
                    seed=seed + i,
                )
                for i in range(tenants)
            ]
    ports = (base_port, base_port + 1, base_port + 2, base_port + 3) if base_port else (0, 0, 0, 0)
    sim = Simulator(
        sim_tenants,
        state_dir,
        token_lifetime=token_lifetime,
        graph_short_pages=graph_short_pages,
        rate_limits=rate_limits,
        ports=ports,
    )
    try:
        sim.start()
    except OSError as exc:
        console.print(f"[red]error[/red]: cannot listen on 127.0.0.1: {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # SIGINT too, explicitly: started as a background job, a process inherits SIGINT ignored and
    # Python then raises no KeyboardInterrupt for it
    previous = signal.signal(signal.SIGTERM, _on_signal)
    previous_int = signal.signal(signal.SIGINT, _on_signal)
    try:
        config_path = sim.write_config(config_out or state_dir / "config.yaml")
        info: dict[str, Any] = {
            **sim.urls(),
            "ca_path": sim.ca_path,
            "config_path": str(config_path.resolve()),
            "tenants": [t.summary() for t in sim.tenants],
        }
        if as_json:
            print_json(info)
        else:
            _print_info(info)
        while not stop.wait(0.5):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        sim.stop()
        console.print("simulator stopped")


def _print_info(info: dict[str, Any]) -> None:
    table = Table(title="Microsoft cloud simulator (127.0.0.1)", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key in (
        "authority_url",
        "graph_url",
        "defender_url",
        "admin_url",
        "ca_path",
        "config_path",
    ):
        table.add_row(key, str(info[key]))
    out.print(table)
    tenants = Table(title="tenants")
    for col in ("tenant_id", "client_id", "users", "machines", "cves", "pairs"):
        tenants.add_column(col)
    for t in info["tenants"]:
        tenants.add_row(
            t["tenant_id"], t["client_id"], str(t["users"]), str(t["machines"]), str(t["cves"]),
            str(t["machine_vulnerability_pairs"]),
        )  # fmt: skip
    out.print(tenants)
    out.print("serving; press Ctrl-C to stop")
