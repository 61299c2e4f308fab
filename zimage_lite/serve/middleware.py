"""ASGI middleware: the body-size limit, the API key, the X-Zimage-Replica header, one access log line."""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import sys
import time

from zimage_lite.serve.errors import ApiError

log = logging.getLogger("zimage_lite.serve.access")
OPEN_PATHS = ("/health", "/ready")  # probes answer without the key
PAGE_PATHS = ("/", "/index.html", "/style.css")  # and the web page's files (no data; it asks for the key)


async def send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `limit` bytes: from Content-Length at once, else counted as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = ApiError(
            413, f"the request body is over this server's {self.limit} bytes", code="body_too_large"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, err)
        seen = 0
        started = False

        async def counting():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, tracking)
        except _TooLarge:
            if not started:
                await send_error(send, err)


class ApiKey:
    """Every path but the probes needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        open_path = path in OPEN_PATHS or path in PAGE_PATHS or path.startswith("/js/")
        if scope["type"] != "http" or open_path or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        err = ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key",
                       type="authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        await send_error(send, err)


def replica_id() -> str:
    """Ray Serve's replica id inside a replica, else host:pid."""
    if "ray.serve" in sys.modules:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # not inside a replica (the driver, a test)
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


class ReplicaAndLog:
    """Adds X-Zimage-Replica to every response; logs method, path, status, ms (never a body: no prompts)."""

    def __init__(self, app, replica: str | None):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.replica is None:
            self.replica = replica_id()  # after deployment: a Ray replica knows its id only then
        replica = self.replica.encode()
        start = time.perf_counter()
        status = [0]

        async def with_header(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                if not any(
                    k.lower() == b"x-zimage-replica" for k, _ in headers
                ):  # a route named a Ray replica
                    headers.append((b"x-zimage-replica", replica))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_header)
        finally:
            ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], ms)
