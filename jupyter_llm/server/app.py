"""The OpenAI-compatible app: routes, error handlers and middleware wired around one manager.

Every error leaves as OpenAI's error object ({"error": {"message", "type", "param",
"code"}}): validation errors are 400 (not FastAPI's 422), unknown routes 404, a user's error
(jupyter_llm.errors) as `protocol.user_error` maps it, anything unexpected a bare 500 without
a trace.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run
# time, and the body models are built inside create_app.
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from jupyter_llm import __version__
from jupyter_llm.errors import UserError
from jupyter_llm.server.metrics import ServerMetrics
from jupyter_llm.server.protocol import FIELD_NAMES, APIError, ErrorResponse, bounded_models, user_error
from jupyter_llm.server.security import GuardMiddleware, KeyChecker, RateLimiter
from jupyter_llm.server.serving import Generation
from jupyter_llm.server.settings import ServerSettings

log = logging.getLogger(__name__)
ERROR_STATUSES = (400, 401, 404, 413, 429, 503)


def create_app(manager: Any = None, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving the backends loaded in `manager` (default: the kernel's manager)."""
    if manager is None:
        from jupyter_llm.manager import get_manager

        manager = get_manager()
    settings = settings or ServerSettings()
    metrics = ServerMetrics(manager)
    generation = Generation(manager, settings, metrics)
    CompletionBody, ChatBody = bounded_models(settings.max_n, settings.max_tokens, settings.max_messages)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        generation.cancel_all()  # under a server that does not cancel them itself (runner.py does)

    app = FastAPI(title="jupyter-llm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over the models loaded in a Jupyter kernel")
    app.state.settings, app.state.metrics, app.state.generation = settings, metrics, generation

    def error_response(error: APIError) -> JSONResponse:
        metrics.error(error.code)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(UserError)  # one that a route did not turn into an APIError itself
    async def user_failure(request: Request, error: UserError) -> JSONResponse:
        return error_response(user_error(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error, request.headers.get("content-type", "")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code, "invalid_request")
        message = f"Unknown request URL: {request.method} {request.url.path}" if error.status_code == 404 \
            else str(error.detail)
        return error_response(APIError(error.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(APIError(500, "The server had an error while processing your request",
                                       type="server_error"))

    @app.get("/health", responses={503: {"description": "no model is loaded yet, or a backend cannot serve"}})
    async def health() -> JSONResponse:
        names = manager.names()
        if not names:
            return JSONResponse({"status": "no model loaded"}, status_code=503)
        failing = {name: reason for name in names if (reason := manager.get(name).health())}
        if failing:
            return JSONResponse({"status": "unavailable", "models": names, "unavailable": failing}, status_code=503)
        return JSONResponse({"status": "ok", "models": names})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", responses={s: {"model": ErrorResponse} for s in ERROR_STATUSES})

    def model_card(name: str) -> dict[str, Any] | None:
        try:
            backend = manager.get(name)
        except Exception:  # noqa: BLE001 unloaded meanwhile
            return None
        return {"id": name, "object": "model", "created": started, "owned_by": "jupyter-llm",
                "root": backend.model_name, "backend": backend.kind, "max_model_len": backend.max_model_len}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        cards = [model_card(name) for name in manager.names()]
        return {"object": "list", "data": [c for c in cards if c is not None]}

    @v1.get("/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        card = model_card(model) if model in manager.names() else None
        if card is None:
            raise APIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
        return card

    streams = {200: {"description": "The answer as JSON, or as server-sent events when `stream` is true",
                     "content": {"text/event-stream": {}}}}

    @v1.post("/completions", responses=streams)
    async def completions(body: CompletionBody, request: Request) -> Response:  # type: ignore[valid-type]
        return await generation.completions(body, request)

    @v1.post("/chat/completions", responses=streams)
    async def chat_completions(body: ChatBody, request: Request) -> Response:  # type: ignore[valid-type]
        return await generation.chat(body, request)

    app.include_router(v1)
    app.openapi = lambda: openapi_without_422(app)  # type: ignore[method-assign]

    async def send_error(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(error)(scope, receive, send)

    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    app.add_middleware(GuardMiddleware, keys=KeyChecker(settings.api_keys), limiter=limiter,
                       max_body_bytes=settings.max_body_bytes, send_error=send_error,
                       allowed_hosts=settings.host_allow_list)
    if settings.cors_origins:  # outermost, so that preflight requests need no key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    return app


def openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document without FastAPI's automatic 422 responses: validation errors are
    400 here, documented with the other errors."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


def validation_error(error: RequestValidationError, content_type: str) -> APIError:
    """FastAPI's validation error as OpenAI's 400 invalid_request_error. Of several errors (a
    union reports one per branch) the most specific one is shown: a wrong value before a
    wrong type, then the deepest."""
    errors = error.errors()
    first = max(errors, key=lambda e: (not e.get("type", "").endswith("_type"), len(e.get("loc", ()))))
    kind = first.get("type", "")
    loc = [str(part) for part in first.get("loc", ())[1:] if isinstance(part, int) or part in FIELD_NAMES]
    if kind == "extra_forbidden":  # OpenAI's own words for a field it does not know
        name = ".".join(str(part) for part in first.get("loc", ())[1:])
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                        code="unknown_parameter")
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON "
                             "(sent with Content-Type: application/json).", code="invalid_json")
    if not loc:
        hint = "the request body must be a JSON object"
        if "json" not in content_type.lower():
            hint += " sent with the header Content-Type: application/json"
        return APIError(400, hint, code="invalid_json")
    path = ".".join(loc)
    code = "missing_required_parameter" if kind == "missing" else \
        "invalid_type" if kind.endswith("_type") else "invalid_value"
    return APIError(400, f"{path}: {first.get('msg', 'invalid value')}", param=path, code=code)
