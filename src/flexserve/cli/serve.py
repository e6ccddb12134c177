"""`flexserve serve`: start the gateway."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from flexserve.cli.options import run_db, until_ready
from flexserve.config import ConfigError, Settings, load_settings
from flexserve.observability.logs import configure as configure_logging

if TYPE_CHECKING:
    import socket

    import uvicorn

    from flexserve.store import Database

DEMO_ORG = "demo"


async def _bootstrap_demo(db: Database, settings: Settings) -> str | None:
    """On an empty database, create the demo organization and return its new key."""
    from flexserve.accounts import Accounts

    if not settings.bootstrap_demo:
        return None
    accounts = Accounts(db)
    if await accounts.count_orgs() > 0:
        return None
    await accounts.create_org(DEMO_ORG, settings.default_service_tier)
    _, key = await accounts.create_key(DEMO_ORG, admin=True)
    return key


def _print_welcome(settings: Settings, key: str | None, model_hint: str) -> None:
    # Bound to every address (in a container, say): one a client can use.
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}"
    key_file = Path(settings.home) / "demo_key"
    if key is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        os.chmod(key_file, 0o600)
        lines = [f"Created organization '{DEMO_ORG}' with an admin API key (also saved to {key_file}):", "", f"  {key}"]
    elif key_file.exists():
        key = key_file.read_text().strip()
        lines = [f"Demo API key (from {key_file}):", "", f"  {key}"]
    else:
        key = "YOUR_KEY"
        lines = ["Create a key with: flexserve keys create --org NAME"]
    lines += [
        "",
        "Try it:",
        "",
        f"  curl {base}/v1/chat/completions \\",
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{model_hint}\", \"service_tier\": \"flex\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}]}'",
        "",
        f"  {_python()} -c \"from openai import OpenAI; "
        f"c = OpenAI(base_url='{base}/v1', api_key='{key}'); "
        f"r = c.chat.completions.create(model='{model_hint}', service_tier='flex', "
        "messages=[{'role': 'user', 'content': 'Say hello in five words.'}]); "
        "print(r.service_tier, r.choices[0].message.content)\"",
        "",
        f"FlexServe listening on http://{settings.host}:{settings.port}  (Ctrl-C to stop)",
    ]
    click.echo("\n".join(lines), err=True)


def _python() -> str:
    """The interpreter to paste: this one (it has the openai package), relative when short."""
    try:
        relative = os.path.relpath(sys.executable)
    except ValueError:
        return sys.executable
    return relative if not relative.startswith("..") else sys.executable


def _model_hint(settings: Settings) -> str:
    if settings.engine == "embedded":
        return "smollm2-135m-instruct"
    if settings.engine == "sim":
        from flexserve.engines.sim import PROFILES

        return PROFILES[settings.sim_profile].model_id
    return "MODEL"


def _server_class() -> type[uvicorn.Server]:
    """The uvicorn server class, imported only when serving (``--help`` stays quick)."""
    import gc

    import uvicorn

    class FrozenAfterStartup(uvicorn.Server):
        """Once the app has started, what start-up allocated (libraries, the
        app, its database engine: ~100,000 objects) is put out of the garbage
        collector's reach, so that a full collection scans only what requests
        allocate: on two cores such a collection paused the loop 60-120 ms, a
        p99 spike every few seconds under load (docs/benchmarks.md)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            gc.collect()
            gc.freeze()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            """As uvicorn shuts down, the requests in progress get the grace to
            finish and are then ended cleanly (api/drain.py), before uvicorn's
            own timeout, set a little later, would cut them."""
            state = getattr(self.config.app, "state", None)
            services = getattr(state, "services", None)  # absent if start-up failed
            ending = None
            if services is not None:
                ending = asyncio.create_task(services.drain.run(services.settings.shutdown_grace))
            await super().shutdown(sockets)
            if ending is not None:
                ending.cancel()

    return FrozenAfterStartup


def _raise_open_files_limit() -> None:
    """Every waiting request holds a socket: lift the soft open-files limit
    (often 1,024) to the hard one, so that thousands of flex requests can wait."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            # An unlimited hard limit may be refused: the soft one then stays.
            logging.getLogger(__name__).warning("could not raise the open-files limit from %d", soft)


def _check_redis(settings: Settings) -> None:
    """Stop, saying why, when the Redis the gateways share cannot be used."""
    if not settings.redis:
        return
    try:
        from flexserve.shared.connect import SharedStateError, connect
    except ImportError as exc:
        raise click.ClickException(
            "setting 'redis' needs redis-py: pip install 'flexserve[redis]'") from exc

    async def ping() -> None:
        await (await connect(settings.redis)).aclose()

    try:
        asyncio.run(ping())
    except SharedStateError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file.")
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8000).")
@click.option("--engine", type=click.Choice(["embedded", "sim", "upstream"]), help="Engine kind.")
@click.option("--upstream", "upstreams", multiple=True, help="Upstream base URL (repeatable: replicas).")
@click.option("--db", envvar="FLEXSERVE_DB", help="Database URL (sqlite:///path, postgresql://…).")
@click.option("--home", envvar="FLEXSERVE_HOME", help="Data directory (default .flexserve).")
@click.option("--redis", envvar="FLEXSERVE_REDIS", help="Redis URL the gateways share (redis://…).")
@click.option("--sim-profile", help="Sim engine profile, with --engine sim.")
@click.option("--sim-speed", type=float, help="Sim engine speed-up, with --engine sim.")
def serve(
    config_file: str | None,
    host: str | None,
    port: int | None,
    engine: str | None,
    upstreams: tuple[str, ...],
    db: str | None,
    home: str | None,
    redis: str | None,
    sim_profile: str | None,
    sim_speed: float | None,
) -> None:
    """Start the OpenAI-compatible gateway.

    On first start with an empty database it creates a demo organization and
    prints its API key with a ready-to-paste curl command.
    """
    overrides = {
        "host": host,
        "port": port,
        "engine": engine,
        "upstreams": list(upstreams) or None,
        "db": db,
        "home": home,
        "redis": redis,
        "sim_profile": sim_profile,
        "sim_speed": sim_speed,
    }
    try:
        settings = load_settings(config_file, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(settings.log_level, settings.log_format,
                      log_requests=settings.log_requests)
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    _raise_open_files_limit()
    # Stops here, saying why, on a database whose schema this FlexServe cannot use.
    # Not announced: a gateway starting would make every other forget its keys.
    # With startup_wait, each is tried again until it is ready (the schema
    # upgraded, too): a gateway started beside them, as in compose.yaml.
    deadline = time.monotonic() + settings.startup_wait
    key = until_ready(
        lambda: run_db(settings, lambda database: _bootstrap_demo(database, settings), announce=False),
        deadline, waiting="Waiting for the database (setting startup_wait)")
    until_ready(lambda: _check_redis(settings), deadline,
                waiting="Waiting for Redis (setting startup_wait)")
    if config_file:
        from flexserve.cli.prices import load_config_prices

        load_config_prices(settings, config_file)
    _print_welcome(settings, key, _model_hint(settings))

    import uvicorn

    from flexserve.api.connections import ConnectionGuard
    from flexserve.api.drain import END_MARGIN
    from flexserve.app import create_app

    # Caps and timeouts on client connections (api/connections.py); its
    # protocol replaces uvicorn's httptools one.
    connections = ConnectionGuard.from_settings(settings)
    connections.fit_open_files_limit()
    config = uvicorn.Config(
        create_app(settings, connections=connections),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        log_level=settings.log_level,
        # uvicorn's own lines go through the root handler above, in the same format.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + END_MARGIN),
        **connections.uvicorn_options(),
    )
    server = _server_class()(config)
    server.run()
    if not server.started:
        # As uvicorn.run does: a failed start-up (port taken, lifespan error) exits non-zero.
        sys.exit(3)
