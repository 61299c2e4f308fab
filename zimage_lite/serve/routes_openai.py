"""OpenAI's images routes: /v1/images/generations (JSON) and /v1/images/edits (multipart). Both run
through the worker's queue and wait for their job; a client that disconnects cancels it."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from zimage_lite.serve.errors import ApiError, bad_request
from zimage_lite.serve.jobs import Job
from zimage_lite.serve.routes_jobs import file_url, ready_server
from zimage_lite.serve.schemas import ImageRequest
from zimage_lite.serve.uploads import decode_base64_image, decode_image, request_images

router = APIRouter()
DISCONNECT_POLL_S = 0.25
_QUALITY_OUT = {"low": "low", "high": "high", "hd": "high"}  # the response names low|medium|high


async def run_and_wait(request: Request, server, job: Job) -> None:
    """Queue `job` and wait for it; cancel it if the client goes away (or this handler is cancelled)."""
    server.submit(job)
    waiter = asyncio.ensure_future(job.wait_done())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if not waiter.done() and await request.is_disconnected():
                break
    finally:
        if not job.done:
            server.worker.cancel(job)
        waiter.cancel()
    if job.state != "succeeded":
        err = job.error or {"message": "cancelled", "code": "cancelled", "type": "server_error"}
        raise ApiError(
            job.status if job.status >= 400 else 500, err["message"], None, err["code"], err["type"]
        )


def response_body(request: Request, req: ImageRequest, job: Job) -> dict:
    data = []
    for r in job.results:
        item = {"revised_prompt": None, "seed": job.params.seed, "index": r["index"]}
        if "b64_json" in r:
            item["b64_json"] = r["b64_json"]
        else:
            item["url"] = file_url(request, r["file"])
        data.append(item)
    return {
        "created": int(time.time()), "data": data, "background": "opaque", "output_format": req.output_format,
        "quality": _QUALITY_OUT.get(req.quality, "medium"), "size": f"{job.params.width}x{job.params.height}",
    }  # fmt: skip


def answer(request: Request, req: ImageRequest, job: Job) -> JSONResponse:
    """The OpenAI response; X-Zimage-Replica names the replica that made the images (on Ray Serve)."""
    headers = {"X-Zimage-Replica": job.replica} if job.replica else None
    return JSONResponse(response_body(request, req, job), headers=headers)


@router.post("/v1/images/generations")
async def generations(body: ImageRequest, request: Request) -> JSONResponse:
    server = ready_server(request)
    max_pixels = server.config.limits.max_upload_pixels
    images = await asyncio.to_thread(request_images, None, None, body.control_image, decode_base64_image,
                                     max_pixels)  # fmt: skip
    params, spec = server.params(body, images)
    job = Job(params, spec, server.config.request_timeout_s)
    await run_and_wait(request, server, job)
    return answer(request, body, job)


async def _form(request: Request) -> tuple[dict, dict[str, list[bytes]]]:
    """Text fields and file parts of a multipart body; `image[]` is `image` (OpenAI sends either)."""
    limits = request.app.state.server.config.limits
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad_request(
            "send multipart/form-data with image (and mask) files", None, "invalid_content_type"
        )
    try:
        form = await request.form(
            max_files=16, max_fields=64, max_part_size=limits.max_prompt_chars * 4 + 1024
        )
    except Exception as exc:  # starlette's MultiPartException and parser errors
        raise bad_request(f"unreadable multipart body ({exc})", None, "invalid_multipart") from None
    fields, files = {}, {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(await value.read())
        else:
            fields[name] = value
    return fields, files


def _edit_request(fields: dict) -> ImageRequest:
    if "loras" in fields or "hires" in fields:
        try:
            for key in ("loras", "hires"):
                if key in fields:
                    fields[key] = json.loads(fields[key])
        except ValueError:
            raise bad_request(f"{key} must be JSON in a multipart form", key) from None
    try:
        return ImageRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}", param) from None


@router.post("/v1/images/edits")
async def edits(request: Request) -> JSONResponse:
    """Image-to-image (image only; `strength`, default 0.6) or inpainting (with `mask`: its transparent
    pixels are re-generated, strength default 1.0). Several images: the first is used."""
    server = ready_server(request)
    limits = server.config.limits
    fields, files = await _form(request)
    if "prompt" not in fields:
        raise bad_request("prompt is required", "prompt", "missing")
    if not files.get("image"):
        raise bad_request("image is required (a file part named image or image[])", "image", "missing")
    body = _edit_request(fields)
    mask = (files.get("mask") or [None])[0]
    images = await asyncio.to_thread(request_images, files["image"][0], mask, body.control_image, decode_image,
                                     limits.max_upload_pixels)  # fmt: skip
    params, spec = server.params(body, images)
    job = Job(params, spec, server.config.request_timeout_s)
    await run_and_wait(request, server, job)
    return answer(request, body, job)
