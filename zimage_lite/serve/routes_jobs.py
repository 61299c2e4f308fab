"""The jobs API (POST/GET/DELETE /v1/jobs, SSE events), what the server has (/v1/models, /v1/info),
probes (/health, /ready), /metrics and /v1/files. Shapes: docs/serve-api.md."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from zimage_lite.serve.errors import ApiError, not_found
from zimage_lite.serve.files import MEDIA
from zimage_lite.serve.jobs import Job
from zimage_lite.serve.schemas import JobRequest, quality_steps
from zimage_lite.serve.uploads import decode_base64_image, request_images

router = APIRouter()


def server_of(request: Request):
    return request.app.state.server


def ready_server(request: Request):
    server = server_of(request)
    if not server.ready:
        from zimage_lite.serve.errors import unavailable

        raise unavailable(server.load_error or "the model is still loading", "not_ready")
    return server


def file_url(request: Request, name: str) -> str:
    return str(request.url_for("get_file", name=name))


def job_view(request: Request, job: Job) -> dict:
    view = job.snapshot()
    for r in view.get("results", []):
        if "file" in r:
            r["url"] = file_url(request, r["file"])
    return view


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    server = server_of(request)
    if server.ready:
        return JSONResponse({"status": "ready", "model": server.engine.model_id})
    message = server.load_error or "the model is still loading"
    err = ApiError(503, message, code="not_ready", type="server_error")
    return JSONResponse(err.body(), status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    server = ready_server(request)
    return {"object": "list", "data": [model_entry(server)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    server = ready_server(request)
    if model_id != server.engine.model_id:
        raise not_found(f"the model {model_id[:100]!r} does not exist here", "model", "model_not_found")
    return model_entry(server)


def model_entry(server) -> dict:
    return {"id": server.engine.model_id, "object": "model", "created": int(server.started),
            "owned_by": "zimage-lite"}  # fmt: skip


@router.get("/v1/info")
async def info(request: Request) -> dict:
    """What a client (the web page) needs: the model, its variant and extras, defaults and limits."""
    server = ready_server(request)
    c = server.config
    offer = server.offer()
    return {
        "model": server.engine.model_id,
        **server.engine.info(),
        "defaults": {
            "steps": offer.default_steps,
            "size": "x".join(map(str, c.default_size)),
            "n": 1,
            "response_format": "b64_json",
            "output_format": "png",
        },  # fmt: skip
        "quality_steps": quality_steps(offer.default_steps),
        "limits": {
            **vars(c.limits),
            "max_queue": c.max_queue,
            "request_timeout_s": c.request_timeout_s,
            "file_ttl_s": c.file_ttl_s,
        },  # fmt: skip
        "queue": {
            "depth": server.worker.depth(),
            "running": bool(server.worker.running),
            "running_jobs": len(server.worker.running),
        },
        "auth": c.api_key is not None,
    }


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> JSONResponse:
    server = ready_server(request)
    c = server.config
    images = await asyncio.to_thread(request_images, body.image, body.mask, body.control_image,
                                     decode_base64_image, c.limits.max_upload_pixels)  # fmt: skip
    params, spec = server.params(body, images)
    job = Job(params, spec, c.request_timeout_s, keep_files=True)
    server.submit(job)
    server.jobs.add(job)
    url = str(request.url_for("get_job", job_id=job.id))
    return JSONResponse(job_view(request, job), status_code=202, headers={"Location": url})


def find_job(request: Request, job_id: str) -> Job:
    job = server_of(request).jobs.get(job_id)
    if job is None:
        raise not_found(f"no job {job_id[:64]!r} (finished jobs are kept for a while, then dropped)",
                        "id", "job_not_found")  # fmt: skip
    return job


@router.get("/v1/jobs/{job_id}", name="get_job")
async def get_job(job_id: str, request: Request) -> dict:
    return job_view(request, find_job(request, job_id))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict:
    job = find_job(request, job_id)
    if job.done:
        raise ApiError(409, f"job {job.id} already {job.state}", "id", "job_finished")
    server_of(request).worker.cancel(job)
    return {**job_view(request, job), "cancel_requested": True}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: `queued` (position), `progress` (step, steps, pass), then one final `result`
    (the job as GET shows it) or `error` ({"error": ...}). Steps that pass while the client is slow are
    folded into the latest state."""
    job = find_job(request, job_id)

    async def stream():
        seen, last = -1, None
        while True:
            seen = await job.changed(seen)
            if job.done:
                if job.state == "succeeded":
                    yield sse("result", job_view(request, job))
                else:
                    yield sse("error", {"error": job.error, "id": job.id, "state": job.state})
                return
            view = (job.state, job.position, job.step, job.pass_index)
            if view == last:
                continue
            last = view
            if job.state == "queued":
                yield sse("queued", {"id": job.id, "position": job.position})
            else:
                yield sse("progress", {"id": job.id, "step": job.step, "steps": job.steps,
                                       "pass": job.pass_index, "passes": job.params.passes()})  # fmt: skip

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/v1/files/{name}", name="get_file")
async def get_file(name: str, request: Request) -> FileResponse:
    path = server_of(request).files.path(name)
    if path is None:
        raise not_found(f"no file {name[:80]!r} (files expire after a while)", "name", "file_not_found")
    return FileResponse(
        path, media_type=MEDIA[path.suffix[1:]], headers={"Cache-Control": "private, max-age=3600"}
    )
