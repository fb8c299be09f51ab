"""`mde-monitor web`: the console (overview, changes, entities, explore, alerts) in a browser."""

from __future__ import annotations

import socket

import typer

from monitor.cli.app import ExitCode, app, console, state


@app.command("web")
def web(
    host: str | None = typer.Option(
        None, "--host", help="Address to bind (default: the config's web.host, 127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None, "--port", help="Port (default: the config's web.port, 8080; 0 picks a free one)."
    ),
) -> None:
    """Serve the console. Off 127.0.0.1 it requires sign-in (web.tokens or web.oidc)."""
    import uvicorn

    from monitor.web import create_app
    from monitor.web.security import is_loopback

    settings = state.settings()
    bind = host or settings.web.host
    if not is_loopback(bind) and not (settings.web.tokens or settings.web.oidc):
        console.print(
            f"refusing to serve on {bind} without authentication: configure web.tokens or"
            " web.oidc (or bind 127.0.0.1)",
            highlight=False,
        )
        raise typer.Exit(ExitCode.USAGE)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so (else every
    # keep-alive response waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, settings.web.port if port is None else port))
    except OSError as exc:
        console.print(f"cannot listen on {bind}: {exc}", highlight=False)
        raise typer.Exit(ExitCode.FAILED) from None
    application = create_app(settings, host=bind)
    shown = f"[{bind}]" if family == socket.AF_INET6 else bind
    console.print(f"console: http://{shown}:{sock.getsockname()[1]}/", highlight=False)
    server = uvicorn.Server(
        uvicorn.Config(
            application,
            log_level="warning",
            proxy_headers=True,
            server_header=False,
            timeout_graceful_shutdown=5,  # live-timeline streams never end by themselves
        )
    )
    server.run(sockets=[sock])
