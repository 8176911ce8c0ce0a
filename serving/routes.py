"""The HTTP API as a FastAPI app, built once per orchestrator replica.

The orchestrator uses Serve's late-bound ingress (``@serve.ingress()`` plus
``__serve_build_asgi_app__``): each replica builds its own app here after its
constructor ran, so the routes (the batch router or its "disabled" stand-in
included) and the error handlers are fixed per replica, and no module-level
app is ever mutated.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from bark_serve.schema.untrusted import clip
from bark_serve.stages.types import InvalidRequestError

from .errors import APIError, to_api_error
from .http_api import check_api_key, key_owner, validation_error
from .voices_api import voice_router

ROUTES = {"speech": "/v1/audio/speech", "tts": "/v1/tts", "voices": "/v1/voices", "models": "/v1/models",
          "batches": "/v1/batches", "health": "/healthz", "ready": "/readyz", "docs": "/docs",
          "openapi": "/openapi.json", "playground": "/playground/", "metrics": "/metrics"}
STATIC_DIR = Path(__file__).with_name("static")  # the playground: package data, served as is
BATCH_DISABLED = ("batch jobs are disabled on this server: set `batch.enabled: true` (and a Redis URL) in the "
                  "config, or start it with `bark-serve up --batch`")


def build_http_app(orch) -> FastAPI:
    """The app of one Orchestrator replica: its routes, the batch routes, and the error handlers."""
    # redirect_slashes off: a path with a trailing slash is a JSON 404 like any unknown path, not a bare 307 whose
    # Location Starlette builds from the client's Host header
    app = FastAPI(title="bark-serve", description="Bark text-to-speech, served stage by stage on Ray Serve.",
                  redirect_slashes=False)
    install_error_handlers(app)
    app.add_middleware(ErrorCounter, on_error=orch.metrics.error)
    app.add_api_route("/", _index(orch), methods=["GET"])
    app.add_api_route("/playground", _to_playground, methods=["GET"], include_in_schema=False)
    app.mount(ROUTES["playground"].rstrip("/"), StaticFiles(directory=STATIC_DIR, html=True), name="playground")
    app.add_api_route(ROUTES["health"], orch.healthz, methods=["GET"])
    app.add_api_route(ROUTES["ready"], orch.readyz, methods=["GET"])
    app.include_router(voice_router(orch))
    app.add_api_route(ROUTES["models"], orch.models, methods=["GET"])
    app.add_api_route(ROUTES["metrics"], _metrics(orch), methods=["GET"], include_in_schema=False)
    app.add_api_route(ROUTES["speech"], orch.speech, methods=["POST"])
    app.add_api_route(ROUTES["tts"], orch.tts, methods=["POST"])
    app.include_router(_batch_routes(orch) if orch.cfg.batch.enabled else _batch_disabled_router())
    return app


def _index(orch):
    """``GET /``: the routes as JSON for API clients; a browser (Accept: text/html) goes to the playground."""

    async def index(request: Request):
        if "text/html" in request.headers.get("accept", ""):
            return _to_playground()
        return await orch.index()

    return index


def _metrics(orch):
    """``GET /metrics``: the cluster's Prometheus metrics on the API port, behind the API keys when they are on."""
    from .metrics import cluster_metrics_text

    async def metrics(request: Request):
        check_api_key(request, orch.api_keys)
        return PlainTextResponse(await cluster_metrics_text(), media_type="text/plain; version=0.0.4")

    return metrics


def _to_playground() -> RedirectResponse:
    # relative, so it stays right under any route prefix: /playground and / both lead to /playground/
    return RedirectResponse("playground/", status_code=307)


class ErrorCounter:
    """ASGI middleware: ``on_error(status, route)`` for every answer of 400 or more, whoever wrote it (an
    exception handler, an endpoint that returned its error, the batch router's guard). An exception that
    escapes the app is answered here, in the API's error shape (``to_api_error``: 503 for a lost replica,
    499 for a cancelled request, 500 for a bug), and counted as answered. The route is the template the
    request matched, ``unmatched`` if none."""

    def __init__(self, app, on_error: "Callable[[int, str], None]"):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    self.on_error(status, _route(scope))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if status:  # a stream that broke after its head was sent: nothing more can be said
                raise
            await to_api_error(exc).response()(scope, receive, watch)


def _route(scope) -> str:
    return getattr(scope.get("route"), "path", None) or "unmatched"


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answered in the API's error shape, ``{"error": {"message", "type", "code"}}``
    (:class:`ErrorCounter` answers the exceptions no handler takes, and counts every error answer)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def router_error(request: Request, exc: StarletteHTTPException):
        """404 / 405 and friends from the router, instead of FastAPI's ``{"detail": ...}``."""
        where = f"{request.method} {clip(request.url.path, 100)}"
        if exc.status_code == 404:
            err = APIError(404, f"no route {where}; see GET / for the routes", "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method not allowed: {where}", "method_not_allowed")
        else:
            err = APIError(exc.status_code, clip(str(exc.detail), 200), "http_error")
        response = err.response()
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError):
        return to_api_error(exc).response()


def _batch_routes(orch) -> APIRouter:
    from .batch_api import BatchLimits, batch_router
    from .batch_app import batch_store_factory

    def require_key(request: Request):
        check_api_key(request, orch.api_keys)

    return batch_router(batch_store_factory(orch.cfg), limits=BatchLimits.from_config(orch.cfg),
                        dependencies=[Depends(require_key)], owner_of=lambda r: key_owner(r, orch.api_keys))


def _batch_disabled_router() -> APIRouter:
    """/v1/batches on a server without batch jobs: a JSON error that says how to turn them on."""
    router = APIRouter(prefix=ROUTES["batches"], include_in_schema=False)

    async def disabled(request: Request):
        raise APIError(404, BATCH_DISABLED, "batch_disabled")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    router.add_api_route("", disabled, methods=methods)
    router.add_api_route("/{rest:path}", disabled, methods=methods)
    return router
