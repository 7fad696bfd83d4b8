"""The gateway application: configuration, the long-lived clients (registry, models, the
control-plane database, rate limiter, metrics) owned by the lifespan, authentication by route
action, the error table, request ids and JSON access logs, health and metrics routes.

    create_app(GatewayConfig(...))  →  Litestar app; `aimass serve` runs it under uvicorn
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme

from controlplane.access import LOCAL, Principal
from controlplane.db import Database
from controlplane.errors import Forbidden
from controlplane.files import FileStore
from controlplane.identity import credentials_exist, csrf_matches
from controlplane.keys import KeyAuthenticator
from controlplane.legacy_keys import import_legacy_keys
from controlplane.quotas import Quotas
from controlplane.settings import SettingsCache
from controlplane.usage import UsageRecorder
from gateway.auth.service import (
    CSRF_FIELD,
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    ModelOwners,
    is_loopback,
    key_principal,
    require_action,
    serves_openly,
    session_principal,
)
from gateway.clock import Clock, monotonic
from gateway.console import routes as console
from gateway.control import auth_routes, overview_routes, project_routes, usage_routes
from gateway.errors import classify
from gateway.library import routes as library_routes
from gateway.limits.service import RateLimiter, make_rate_limiter
from gateway.metrics import GatewayMetrics
from gateway.models.deployments import Loader
from gateway.models.routing import Catalog
from gateway.models.service import ModelManager, ModelsConfig
from gateway.openai.routes import ROUTES
from gateway.openai.service import GenerationService, Limits
from gateway.training import routes as training_routes
from registry.registry import Registry

log = logging.getLogger("aimass.gateway")
access = logging.getLogger("aimass.access")


@dataclass(frozen=True)
class GatewayConfig:
    # registry URI (a folder or s3://bucket/prefix)
    registry: str
    # the control-plane database URL (sqlite:///… or postgresql://…); None: $AIMASS_DATABASE,
    # else $AIMASS_HOME/aimass.db
    database: str | None = None
    # the former SQLite key file whose keys are imported at start (None: none)
    legacy_keys: Path | None = None
    # where the gateway listens; auth may be off only on a loopback address
    host: str = "127.0.0.1"
    # how long a person's sign-in lasts (the session cookie and its row)
    session_ttl_s: float = 12 * 3600.0
    # Redis URL for rate limits shared by gateway replicas; None keeps them in memory
    redis_url: str | None = None
    # bytes of request body accepted (413 above)
    max_body_bytes: int = 1 << 20
    # prompt and output bounds, default per-key rate limits
    limits: Limits = field(default_factory=Limits)
    # serverless lifecycle and engine settings
    models: ModelsConfig = field(default_factory=ModelsConfig)
    # seconds between writes of usage counts to the database (a clean stop writes the rest)
    usage_flush_s: float = 2.0

    def __post_init__(self) -> None:
        if not 60 <= self.session_ttl_s <= 30 * 86400:
            raise ValueError(
                f"GatewayConfig.session_ttl_s = {self.session_ttl_s} must be in [60, 2592000] "
                "(a minute to 30 days)"
            )
        if not 0 < self.usage_flush_s <= 3600:
            raise ValueError(
                f"GatewayConfig.usage_flush_s = {self.usage_flush_s} must be in (0, 3600]"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(
                f"GatewayConfig.max_body_bytes = {self.max_body_bytes} must be >= 1024"
            )


# ── authentication: every route states its action in opt; no action means public ──


async def auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    action = handler.opt.get("action")
    if action is None:
        return
    state = connection.app.state
    if await serves_openly(state, connection.headers):
        # no users or keys exist and the gateway listens on loopback only (said at start): any
        # or no key is accepted (clients such as openai's insist on sending one)
        connection.state["principal"] = LOCAL
        return
    authorization = connection.headers.get("authorization")
    cookie = connection.cookies.get(SESSION_COOKIE)
    if authorization or not cookie:  # a program's key (MissingKey when there is neither)
        principal, connection.state["key"] = await key_principal(state.authenticator, authorization)
    else:  # a person's session
        principal, signed_in = await session_principal(state.db, cookie)
        if connection.scope["method"] not in SAFE_METHODS:
            await _check_csrf(connection, signed_in.csrf_token)
        connection.state["session"] = signed_in
    require_action(principal, action)
    connection.state["principal"] = principal


async def _check_csrf(connection: ASGIConnection, expected: str) -> None:
    """A state-changing request signed in by cookie carries the session's CSRF token (header,
    or a form field for HTML forms): another site can make a browser send the cookie, never
    the token."""
    given = connection.headers.get(CSRF_HEADER)
    content_type = connection.headers.get("content-type", "")
    if given is None and content_type.startswith("application/x-www-form-urlencoded"):
        form = await Request(connection.scope, connection.receive).form()  # cached for the handler
        given = form.get(CSRF_FIELD)
    if not csrf_matches(expected, given):
        raise Forbidden(
            f"a request signed in by the session cookie must carry the session's CSRF token in "
            f"the {CSRF_HEADER} header (or a {CSRF_FIELD} form field)"
        )


def _principal(request: Request) -> Principal:
    return request.state["principal"]


# ── errors: one table (gateway/errors.py), OpenAI's shape, litestar's own errors included ──


def error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        # litestar's 413 does not say the limit; the message should
        limit = request.app.state.config.max_body_bytes
        exc = RequestEntityTooLarge(detail=f"the request body exceeds the limit of {limit} bytes")
    status, payload, headers = classify(exc)
    request.state["error"] = payload["error"]["code"]
    return Response(payload, status_code=status, headers=headers)


# ── request ids and access logs (raw ASGI: covers streams and errors alike) ──


def request_context(app):
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]  # fmt: skip
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            state = scope.get("state", {})
            duration = time.perf_counter() - started
            model = state.get("model", "")
            if scope["path"].startswith("/v1/"):
                metrics = scope["app"].state.metrics
                metrics.observe_request(model or "-", scope["path"], status, duration)
            key = state.get("key")
            access.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(duration * 1000, 2),
                    "model": model or None,
                    "key_id": key.key_id if key else None,
                    "error": state.get("error"),
                },
            )

    return middleware


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras."""

    _plain = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out |= {k: v for k, v in vars(record).items() if k not in self._plain}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# ── health and metrics ──


@get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


class Readiness(msgspec.Struct):
    ready: bool
    models: dict[str, str]  # each loaded deployment ("tiny:1") and its engine's health
    problems: list[str]  # why not ready; empty when ready


NOT_READY = ResponseSpec(
    Readiness, description="Not ready; `problems` says why", generate_examples=False
)


@get(
    "/readyz",
    summary="Readiness: registry reachable, no load in progress, engines healthy",
    responses={503: NOT_READY},
)
async def readyz(models: NamedDependency[ModelManager]) -> Response[Readiness]:
    problems = []
    try:
        await asyncio.to_thread(models.registry.models)
    except Exception as e:
        problems.append(f"registry: {e}")
    loaded = {}
    for d in models.deployments:
        health = await d.engine.health()
        loaded[d.ref] = health.status
        if not health.ok:
            problems.append(f"{d.ref}: {health.status} {health.detail}".strip())
    if not models.ready():
        problems.append("a model is loading")
    status = 200 if not problems else 503
    return Response(Readiness(not problems, loaded, problems), status_code=status)


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics_route(request: Request, models: NamedDependency[ModelManager]) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    for d in models.deployments:
        with contextlib.suppress(Exception):
            metrics.observe_engine(d.name, await d.engine.stats())
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)


# ── the application ──

API_KEY = SecurityScheme(
    type="http",
    scheme="bearer",
    description="An API key, `aim_<id>_<secret>`; routes name the scopes they need",
)


def create_app(
    config: GatewayConfig,
    *,
    catalog: Catalog | None = None,
    loader: Loader | None = None,
    db: Database | None = None,
    limiter: RateLimiter | None = None,
    clock: Clock = monotonic,
) -> Litestar:
    """The gateway for `config`. Collaborators not given are built from it: `catalog`, the
    registry that routes model names (Registry.open(config.registry)); `loader`, where engines
    come from (the registry's packages in process, or config.models.remote engine servers);
    `db`, the control-plane database (config.database, migrated to the newest schema, with
    config.legacy_keys imported); `limiter`, the rate limiter (config.redis_url, else in
    memory). The app owns what it is given: it closes them when it stops. `clock` is the time
    of every TTL, idle window, key cache and rate bucket in the app."""
    metrics = GatewayMetrics()
    models = ModelManager(
        catalog if catalog is not None else Registry.open(config.registry),
        config.models,
        loader=loader,
        clock=clock,
        on_load=lambda d: metrics.model_up(d.name, str(d.version), d.load_s),
        on_unload=lambda d: metrics.model_down(d.name, str(d.version)),
        on_refused=lambda name, version: metrics.observe_deployment(name, version, failed=True),
    )
    if db is None:
        db = Database.open(config.database)
        db.upgrade()
    if config.legacy_keys is not None:
        import_legacy_keys(db, config.legacy_keys)
    settings = SettingsCache(db, clock=clock)
    usage = UsageRecorder(db, flush_every_s=config.usage_flush_s)
    quotas = Quotas(db, settings, usage, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        rates = limiter
        if rates is None:
            rates = await make_rate_limiter(config.redis_url, clock=clock)
        app.state.generation = GenerationService(
            models, rates, metrics, config.limits, usage=usage, quotas=quotas, settings=settings,
            owners=app.state.model_owners,
        )  # fmt: skip
        await models.start()
        usage.start()
        try:
            yield
        finally:
            await models.close()  # requests end first: their usage is recorded
            await rates.close()
            try:
                await asyncio.to_thread(usage.close)
            except Exception as e:  # the database is gone: say what is lost
                log.error("usage not written at shutdown: %s", e)
            db.close()

    with db.session() as s:
        open_access = not credentials_exist(s) and is_loopback(config.host)
    state = State(
        {
            "config": config,
            "metrics": metrics,
            "db": db,
            "settings": settings,
            "authenticator": KeyAuthenticator(db, clock=clock),
            "model_owners": ModelOwners(db, clock=clock),
            "open_access": open_access,
            "open_access_checked": clock(),
            "clock": clock,
            "files": FileStore.open(config.registry),  # uploaded training files
            "catalog": models.registry,  # fine-tuning jobs check their base model in it
        }
    )
    return Litestar(
        route_handlers=[
            *ROUTES,
            *auth_routes.ROUTES,
            *project_routes.ROUTES,
            *usage_routes.ROUTES,
            *overview_routes.ROUTES,
            *training_routes.ROUTES,
            *library_routes.ROUTES,
            healthz,
            readyz,
            metrics_route,
            *console.routes(),
        ],
        dependencies={
            "models": Provide(lambda: models, sync_to_thread=False),
            "generation": Provide(_generation, sync_to_thread=False),
            "principal": Provide(_principal, sync_to_thread=False),
        },
        guards=[auth_guard],
        exception_handlers={Exception: error_response},
        middleware=[request_context, console.static_security_headers],
        template_config=console.template_config(),
        lifespan=[lifespan],
        state=state,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="aimass gateway",
            version="0.1.0",
            path="/docs",
            components=Components(security_schemes={"bearer": API_KEY}),
        ),
        logging_config=None,
    )


def _generation(request: Request) -> GenerationService:
    return request.app.state.generation
