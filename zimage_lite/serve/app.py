"""The FastAPI app: middleware, error shape, lifespan (load the model, start the worker, drain at the
end). `create_app` is the one app uvicorn serves and Ray Serve wraps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.errors import ApiError
from zimage_lite.serve.middleware import ApiKey, BodyLimit, ReplicaAndLog
from zimage_lite.serve.server import Server

log = logging.getLogger(__name__)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return _error_response(ApiError(400, "the body is not valid JSON", None, "invalid_json"))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return _error_response(ApiError(400, message, param, "invalid_value"))


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return _error_response(ApiError(exc.status_code, str(exc.detail), None, code))


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(ApiError(500, f"internal error ({type(exc).__name__})", type="server_error",
                                    code="internal"))  # fmt: skip


def create_app(config: ServeConfig, engine=None, load: Callable | None = None) -> FastAPI:
    """The app for `config`; `engine` already loaded (the CLI loads it first so a bad model is one error
    line), or `load(config)` run at startup in a thread (/health answers meanwhile, /ready says 503)."""
    from zimage_lite.serve.routes_jobs import router as jobs_router
    from zimage_lite.serve.routes_openai import router as openai_router

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server = app.state.server = Server(config)
        loading = None
        if engine is not None:
            server.attach(engine)
        else:
            loading = asyncio.create_task(_load(server, load))
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()
            server.drain()
            server.close()

    app = FastAPI(title="zimage-lite", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, lambda request, exc: _error_response(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(jobs_router)
    app.include_router(openai_router)
    from fastapi.staticfiles import StaticFiles  # the web page (static/) at /, after every API route

    app.mount("/", StaticFiles(packages=[("zimage_lite.serve", "static")], html=True), name="page")
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    if config.cors_origins:  # outside the key check, so a refusal still carries the CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Zimage-Replica", "Retry-After"])  # fmt: skip
    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)
    app.add_middleware(ReplicaAndLog, replica=config.replica)
    return app


async def _load(server: Server, load: Callable | None) -> None:
    from zimage_lite.serve.engine import Engine

    try:
        engine = await asyncio.to_thread(load or Engine.load, server.config)
    except Exception as exc:
        from zimage_lite.cli_errors import describe

        server.load_error = f"the model failed to load: {describe(exc)[0]}"
        log.error("%s", server.load_error)
        return
    server.attach(engine)
