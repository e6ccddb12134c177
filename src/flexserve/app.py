"""The ASGI app factory and its lifespan.

Everything app-wide — database, accounts, engines, scheduler, usage writer,
metrics — is built in the lifespan from the ``Settings`` handed in, kept on
``app.state.services`` for the handlers, and torn down in reverse order (the
usage writer is flushed last, so that no record of a finished request is lost
on shutdown).

The app is Starlette, except for the inference endpoints' POSTs (chat,
completions, responses, embeddings): nearly all of the traffic, answered by
one bare ASGI pipeline ahead of Starlette's middleware and routing
(``FlexServeApp``, ``api/pipeline.py``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from flexserve.accounts import Accounts
from flexserve.accounts.hash_pool import HashPool
from flexserve.accounts.verification import Verifications
from flexserve.api.asgi import send_error
from flexserve.api.auth import KeyCache, ambiguous_authorization
from flexserve.api.connections import ConnectionGuard
from flexserve.api.errors import DATABASE_ERRORS, handle_exception
from flexserve.api.gates import Gate
from flexserve.api.inference import Endpoint
from flexserve.api.metrics import GatewayMetrics
from flexserve.api.request_id import RequestIdMiddleware, new_request_id
from flexserve.api.pipeline import serve
from flexserve.api.request_line import nul_in_request_line
from flexserve.api.routes import inference_endpoints, routes
from flexserve.api.state import Services
from flexserve.batches import Batches
from flexserve.billing.journal import UsageJournal
from flexserve.billing.ratelimit import CallRate
from flexserve.billing.usage import UsageWriter
from flexserve.config import Settings
from flexserve.engines.base import Engine
from flexserve.errors import FlexServeError
from flexserve.files import Files
from flexserve.dashboard.sessions import Sessions
from flexserve.observability.history import LiveHistory
from flexserve.observability.loop_lag import LoopLag
from flexserve.observability.tracing import Tracing
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.scheduler.scheduler import Scheduler
from flexserve.store.database import Database

if TYPE_CHECKING:
    from flexserve.shared.connect import SharedState

log = logging.getLogger(__name__)


def scheduler_config(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        tiers_enabled=settings.tiers_enabled,
        flex_max_wait=settings.flex_max_wait,
        flex_headroom=settings.flex_headroom,
        flex_kv_threshold=settings.flex_kv_threshold,
        flex_max_engine_waiting=settings.flex_max_engine_waiting,
        tpot_slo=settings.tpot_slo,
        default_placement=settings.default_placement,
        split_prefill_tokens=settings.split_prefill_tokens,
        split_prefill_concurrency=settings.split_prefill_concurrency,
        load_stale_after=settings.load_stale_after,
        scrape_interval=settings.scrape_interval,
        preempt_cooldown=settings.preempt_cooldown,
        priority_share=settings.priority_share,
        max_queue=settings.max_queue,
        fair_quantum=settings.fair_quantum,
        replica_backoff=settings.replica_backoff,
        replica_silent_after=settings.replica_silent_after,
    )


def build_engines(settings: Settings) -> list[Engine]:
    """The engine replicas the settings ask for (not started yet)."""
    if settings.engine == "embedded":
        from flexserve.engines.embedded import EmbeddedEngine

        return [
            EmbeddedEngine(
                settings.embedded_model_path or None,
                num_slots=settings.embedded_slots,
                max_decoding=settings.embedded_max_decoding,
                n_ctx=settings.embedded_n_ctx,
            )
        ]
    if settings.engine == "sim":
        from flexserve.engines.sim import SimEngine

        return [
            SimEngine(
                settings.sim_profile, speed=settings.sim_speed, max_num_seqs=settings.sim_max_num_seqs,
                cost_model=settings.sim_cost_model,
            )
        ]
    from flexserve.engines.upstream import UpstreamEngine

    step_model = None
    if settings.upstream_profile:
        from flexserve.engines.sim.profiles import PROFILES
        from flexserve.engines.sim.profiles import step_model as profile_step_model

        step_model = profile_step_model(PROFILES[settings.upstream_profile], settings.sim_cost_model)
    return [
        UpstreamEngine(
            url,
            api_key=settings.upstream_api_key,
            capacity=settings.upstream_capacity,
            timeout=settings.upstream_timeout,
            connect_timeout=settings.upstream_connect_timeout,
            first_token_timeout=settings.upstream_first_token_timeout,
            idle_timeout=settings.upstream_idle_timeout,
            send_priority=settings.upstream_priority_hint,
            stream_interval=settings.upstream_stream_interval,
            step_model=step_model,
        )
        for url in settings.upstreams
    ]


async def _shared_state(
    settings: Settings, stack: AsyncExitStack, scheduler: Scheduler
) -> SharedState | None:
    """Engine slots, budgets and rate limits in the Redis every gateway
    shares (setting ``redis``); None: kept in this process."""
    if not settings.redis:
        return None
    from flexserve.shared.connect import open_shared

    return await open_shared(settings, stack, scheduler)


def _reload(services: Services) -> Callable[[], None]:
    """What a gateway does when told the database changed: forget the keys
    it knows and reload its policy now."""

    def reload() -> None:
        services.keys.forget()
        services.gate.refresh_soon()

    return reload


async def _start_engines(engines: list[Engine], stack: AsyncExitStack) -> list[Engine]:
    started = []
    for engine in engines:
        try:
            await engine.start()
        except FlexServeError as exc:
            # One unreachable replica must not keep the gateway down.
            log.error("engine %s did not start: %s", engine.name, exc.message)
            await engine.close()
            continue
        stack.push_async_callback(engine.close)
        started.append(engine)
    return started


class FlexServeApp(Starlette):
    """Starlette, with the inference endpoints' POSTs answered before its
    middleware and routing. In process, on an instant reply, Starlette's
    request and response objects, router and middleware took about a third
    of a non-streamed chat request's time and most of a stream's
    (docs/benchmarks.md, "Hot path")."""

    def __init__(self, endpoints: dict[str, Endpoint], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Before any route: each would read a different copy of the header,
            # or carry the NUL into a database that refuses it.
            refused = ambiguous_authorization(scope["headers"]) or nul_in_request_line(
                scope["path"], scope["query_string"])
            if refused is not None:
                await send_error(send, refused, [(b"x-request-id", new_request_id().encode())])
                return
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._endpoint(scope)
            if endpoint is not None:
                await serve(endpoint, self.state.services, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        # RequestIdMiddleware goes around Starlette's whole stack, outside its
        # ServerErrorMiddleware: the 500 that answers an unhandled error is
        # sent through it, and carries x-request-id like every other answer.
        return RequestIdMiddleware(super().build_middleware_stack())

    def _endpoint(self, scope: Scope) -> Endpoint | None:
        """The endpoint of the request's path, as Starlette's router would match it."""
        path: str = scope["path"]
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            root_path: str = scope.get("root_path", "")
            if root_path and path.startswith(root_path):
                endpoint = self._endpoints.get(path[len(root_path):])
        return endpoint


def create_app(
    settings: Settings, engines: list[Engine] | None = None, connections: ConnectionGuard | None = None
) -> Starlette:
    """The FlexServe ASGI app. ``engines`` overrides what the settings ask for
    (tests hand in an in-process sim engine); ``connections`` is the guard of
    the server that serves it, whose counts ``/metrics`` then shows."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            db = Database.from_url(settings.database_url)
            stack.push_async_callback(db.close)
            await db.prepare()
            accounts = Accounts(db)
            usage = UsageWriter(
                db, flush_interval=settings.usage_flush_interval, batch_size=settings.usage_batch_size,
                journal=UsageJournal(Path(settings.home) / "usage-journal"),
                max_pending=settings.usage_max_pending,
            )
            # Replays the rows a killed process journaled: before the gate
            # seeds the budgets from the ledger, below.
            await usage.start()
            stack.push_async_callback(usage.close)
            started = await _start_engines(
                engines if engines is not None else build_engines(settings), stack
            )
            if not started:
                log.error("no engine replica started: every model request will get 404/503")
            scheduler = Scheduler.from_engines(started, scheduler_config(settings))
            await scheduler.start()
            stack.push_async_callback(scheduler.close)
            shared = await _shared_state(settings, stack, scheduler)
            gate = Gate(
                db,
                budgets=None if shared is None else shared.budgets,
                limiter=None if shared is None else shared.limits,
                refresh_interval=settings.policy_refresh_interval,
                max_output_tokens=settings.max_completion_tokens,
                context_lengths={c.id: c.max_model_len for e in started for c in e.models()},
            )
            await gate.start()
            stack.push_async_callback(gate.close)
            hashes = HashPool(settings.hash_threads, settings.hash_queue)
            stack.callback(hashes.close)
            tracing = Tracing(settings.otlp_endpoint, settings.otel_service_name)
            stack.callback(tracing.close)
            app.state.services = Services(
                settings=settings,
                accounts=accounts,
                keys=KeyCache(accounts),
                scheduler=scheduler,
                usage=usage,
                metrics=GatewayMetrics(scheduler, None if connections is None else connections.collector),
                gate=gate,
                verifications=Verifications(db, hashes=hashes),
                db=db,
                verification_rate=CallRate(
                    settings.verification_submissions_per_minute, "identity-document submissions"
                ),
                files=Files(db, Path(settings.files_dir or Path(settings.home) / "files"),
                            in_database=settings.files_in_database),
                tracing=tracing,
                sessions=Sessions(settings.dashboard_session_seconds),
            )
            lag = LoopLag(app.state.services.metrics.registry)
            lag.start()
            stack.push_async_callback(lag.close)
            history = LiveHistory(scheduler, interval=settings.dashboard_sample_seconds)
            app.state.services.history = history
            history.start()
            stack.push_async_callback(history.close)
            if shared is not None:
                from flexserve.shared.connect import listen_for_changes

                await listen_for_changes(shared, stack, _reload(app.state.services))
            # Batches in progress when the gateway stopped carry on from here.
            batches = Batches(app.state.services, endpoints, app.state.services.files)
            app.state.services.batches = batches
            await batches.start()
            stack.push_async_callback(batches.close)
            yield

    endpoints = inference_endpoints()
    return FlexServeApp(
        {endpoint.path: endpoint for endpoint in endpoints},
        routes=routes(endpoints),
        # A domain error, or a busy database (503), is answered by
        # ExceptionMiddleware (no traceback logged); anything else by
        # ServerErrorMiddleware, logged as the bug it is.
        exception_handlers={
            FlexServeError: handle_exception,
            HTTPException: handle_exception,
            **dict.fromkeys((*DATABASE_ERRORS, DBAPIError), handle_exception),
            Exception: handle_exception,
        },
        lifespan=lifespan,
    )
