"""`zimage-lite serve` on the tiny synthetic model, through real clients (the openai package, httpx)
against a live server on 127.0.0.1: the OpenAI routes, the jobs API with SSE and cancel, the bad
requests the issue lists, and images equal to the Pipeline's own for the same seed."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.serve_live import live_server, write_lora
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model

TARGETS = ("attention.to_q", "attention.to_v", "feed_forward.w1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny):
    return Pipeline.load(tiny, device="cpu")


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(pipe.transformer, folder / "style.safetensors", TARGETS, seed=1)
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def server(tiny, lora_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    args = ["--size", "32x32", "--steps", "2", "--max-steps", "1000", "--lora-dir", str(lora_dir),
            "--output-dir", str(tmp / "out"), "--max-queue", "4", "--model-id", "zimage-tiny"]  # fmt: skip
    with live_server(tiny, tmp, *args) as live:
        yield live


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def ours(pipe, prompt, **kw) -> np.ndarray:
    return np.asarray(pipe.generate(prompt, **kw)[0]).astype(np.int16)


def test_generate_with_openai_client_equals_the_pipeline(client, pipe):
    r = client.images.generate(model="zimage-tiny", prompt="a red fox", size="32x32", n=1,
                               response_format="b64_json", extra_body={"seed": 7, "steps": 2})  # fmt: skip
    data = base64.b64decode(r.data[0].b64_json)
    got = pixels(data)
    assert got.shape == (32, 32, 3)
    want = ours(pipe, "a red fox", seed=7, steps=2, width=32, height=32)
    assert np.abs(got - want).max() <= 1
    meta = Image.open(io.BytesIO(data)).text
    assert meta["prompt"] == "a red fox" and meta["seed"] == "7" and meta["steps"] == "2"


def test_same_prompt_again_hits_the_prompt_cache_and_gives_the_same_image(client, server):
    def hits():
        text = httpx.get(f"{server.url}/metrics").text
        line = [
            x
            for x in text.splitlines()
            if x.startswith('zimage_cache_events{cache="prompt_features",result="hit"}')
        ]
        return float(line[0].split()[-1]) if line else 0.0

    kw = dict(model="zimage-tiny", prompt="a cached prompt", size="32x32", extra_body={"seed": 3, "steps": 2})
    first = client.images.generate(**kw)
    before = hits()
    second = client.images.generate(**kw)
    assert hits() == before + 1
    assert base64.b64decode(first.data[0].b64_json) == base64.b64decode(second.data[0].b64_json)


def test_url_response_serves_the_file_and_webp_jpeg_formats(client, server):
    r = client.images.generate(model="zimage-tiny", prompt="a boat", size="48x32", n=2, response_format="url",
                               extra_body={"seed": 1, "output_format": "webp"})  # fmt: skip
    assert len(r.data) == 2
    for item in r.data:
        assert item.url.startswith(server.url + "/v1/files/") and item.url.endswith(".webp")
        got = httpx.get(item.url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(got.content)).size == (48, 32)
    r = client.images.generate(prompt="a boat", size="32x32", extra_body={"output_format": "jpeg"})
    assert base64.b64decode(r.data[0].b64_json)[:3] == b"\xff\xd8\xff"
    assert httpx.get(f"{server.url}/v1/files/../../etc/passwd").status_code == 404
    assert httpx.get(f"{server.url}/v1/files/{'0' * 32}.png").json()["error"]["code"] == "file_not_found"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_edit_with_mask_in_openai_convention_equals_the_pipeline_inpaint(client, pipe, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, 16:] = 0  # transparent right half: edited
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    (tmp_path / "init.png").write_bytes(_png(init))
    (tmp_path / "mask.png").write_bytes(_png(mask))
    with open(tmp_path / "init.png", "rb") as im, open(tmp_path / "mask.png", "rb") as mk:
        r = client.images.edit(model="zimage-tiny", image=im, mask=mk, prompt="a window",
                               extra_body={"seed": 5, "steps": 2, "strength": 1.0})  # fmt: skip
    got = pixels(base64.b64decode(r.data[0].b64_json))
    ours_mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    want = ours(
        pipe, "a window", seed=5, steps=2, width=32, height=32, image=init, mask=ours_mask, strength=1.0
    )
    assert np.abs(got - want).max() <= 1


def test_guidance_and_negative_prompt_equal_the_pipeline(client, pipe):
    extra = {"seed": 4, "steps": 2, "guidance": 3.0, "negative_prompt": "blurry"}
    r = client.images.generate(prompt="a bridge", size="32x32", extra_body=extra)
    got = pixels(base64.b64decode(r.data[0].b64_json))
    want = ours(
        pipe, "a bridge", seed=4, steps=2, width=32, height=32, guidance=3.0, negative_prompt="blurry"
    )
    assert np.abs(got - want).max() <= 1
    unguided = ours(pipe, "a bridge", seed=4, steps=2, width=32, height=32)
    assert np.abs(got - unguided).max() > 1


def test_hires_pass_equals_the_pipeline_hires_fix(client, pipe):
    r = client.images.generate(prompt="a hill", size="16x16", extra_body={"seed": 6, "steps": 2,
                               "hires": {"scale": 2.0, "strength": 0.5}})  # fmt: skip
    got = pixels(base64.b64decode(r.data[0].b64_json))
    first = pipe.generate("a hill", seed=6, steps=2, width=16, height=16)[0]
    want = np.asarray(pipe.hires_fix(first, "a hill", scale=2.0, strength=0.5, seed=6, steps=2)[0]).astype(
        np.int16
    )
    assert got.shape == (32, 32, 3) and np.abs(got - want).max() <= 1


def test_job_with_base64_image_and_mask_equals_the_pipeline_inpaint(server, pipe):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:16] = 0  # transparent top half: edited
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    as_url = lambda im: "data:image/png;base64," + base64.b64encode(_png(im)).decode()  # noqa: E731
    body = {"prompt": "a roof", "image": as_url(init), "mask": as_url(mask), "seed": 8, "steps": 2}
    job = httpx.post(f"{server.url}/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while (view := httpx.get(f"{server.url}/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert view["state"] == "succeeded" and view["size"] == "32x32"
    got = pixels(httpx.get(view["results"][0]["url"]).content)
    ours_mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    want = ours(pipe, "a roof", seed=8, steps=2, width=32, height=32, image=init, mask=ours_mask)
    assert np.abs(got - want).max() <= 1


def test_uploaded_jpeg_with_exif_orientation_is_used_as_shown(server, pipe):
    """A phone's JPEG: pixels stored 64x32, EXIF Orientation=6 (shown turned, 32x64). The job's size
    (auto: the image's) and pixels are those of the picture as shown, as diffusers' load_image reads it."""
    from PIL import ImageOps

    rng = np.random.default_rng(4)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(buf, "JPEG", exif=exif.tobytes())
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
    body = {"prompt": "a mast", "image": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(),
            "strength": 0.7, "seed": 3, "steps": 2}  # fmt: skip
    job = httpx.post(f"{server.url}/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while (view := httpx.get(f"{server.url}/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert view["state"] == "succeeded" and view["size"] == "32x64", view
    got = pixels(httpx.get(view["results"][0]["url"]).content)
    want = ours(pipe, "a mast", seed=3, steps=2, width=32, height=64, image=shown, strength=0.7)
    assert np.abs(got - want).max() <= 1


def test_lora_by_name_equals_the_pipeline_with_that_lora(client, tiny, lora_dir):
    r = client.images.generate(prompt="a tree", size="32x32",
                               extra_body={"seed": 2, "steps": 2, "loras": [{"name": "style", "scale": 0.7}]})  # fmt: skip
    plain = client.images.generate(prompt="a tree", size="32x32", extra_body={"seed": 2, "steps": 2})
    with_lora = Pipeline.load(tiny, device="cpu")
    with_lora.load_lora(lora_dir / "style.safetensors", 0.7)
    want = ours(with_lora, "a tree", seed=2, steps=2, width=32, height=32)
    got = pixels(base64.b64decode(r.data[0].b64_json))
    assert np.abs(got - want).max() <= 1
    assert np.abs(pixels(base64.b64decode(plain.data[0].b64_json)) - want).max() > 1  # switched back off


def test_models_info_health_ready(server):
    health = httpx.get(f"{server.url}/health", headers={"Origin": "http://page.test"})
    assert health.json() == {"status": "ok"}
    assert "access-control-allow-origin" not in health.headers  # no CORS unless --cors-origin
    assert httpx.get(f"{server.url}/ready").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["zimage-tiny"]
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["variant"] == "turbo" and info["loras"] == ["style"] and info["controlnet"] is False
    assert info["defaults"]["size"] == "32x32" and info["quality_steps"]["low"] == 1
    r = httpx.get(f"{server.url}/health")
    assert r.headers["x-zimage-replica"].endswith(f":{server.pid}")


def _sse(lines, until=("result", "error")) -> list[tuple[str, dict]]:
    """The events of an SSE stream's lines, up to the first named in `until`."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            if name in until:
                break
    return events


def test_job_with_sse_progress_and_result(server):
    """Queued behind a blocker (so the stream surely starts before the job does), then per-step progress
    and the result."""
    blocker = httpx.post(
        f"{server.url}/v1/jobs", json={"prompt": "blocker", "size": "512x512", "steps": 1000}
    )
    body = {"prompt": "a lighthouse", "size": "32x32", "steps": 200, "seed": 11}
    r = httpx.post(f"{server.url}/v1/jobs", json=body)
    assert r.status_code == 202
    job = r.json()
    assert job["state"] == "queued" and r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=60) as s:
        lines = s.iter_lines()
        first = _sse(lines, until=("queued",))
        assert first == [("queued", {"id": job["id"], "position": 0})]
        assert httpx.delete(f"{server.url}/v1/jobs/{blocker.json()['id']}").status_code == 200
        events = _sse(lines)
    assert events[-1][0] == "result"
    steps = [e["step"] for name, e in events if name == "progress"]
    assert len(steps) > 1 and steps == sorted(set(steps)) and steps[-1] <= 200  # 0: it started
    final = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
    assert final["state"] == "succeeded" and final["step"] == 200 and final["steps"] == 200
    assert events[-1][1]["results"] == final["results"]
    img = httpx.get(final["results"][0]["url"])
    assert Image.open(io.BytesIO(img.content)).text["seed"] == "11"


def test_cancel_a_running_job_between_steps(server):
    r = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "long", "size": "512x512", "steps": 1000})
    job_id = r.json()["id"]
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=60) as s:
        lines = s.iter_lines()
        for line in lines:
            if line.startswith("event: progress"):
                break
        cancel = httpx.delete(f"{server.url}/v1/jobs/{job_id}")
        assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
        rest = _sse(lines)
    assert rest[-1][0] == "error" and rest[-1][1]["error"]["code"] == "cancelled"
    final = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
    assert final["state"] == "cancelled" and 1 <= final["step"] < 1000
    assert httpx.delete(f"{server.url}/v1/jobs/{job_id}").status_code == 409
    # the worker goes on serving
    ok = httpx.post(
        f"{server.url}/v1/images/generations", json={"prompt": "after", "size": "16x16"}, timeout=60
    )
    assert ok.status_code == 200


def test_client_disconnect_cancels_its_job(server):
    body = {"prompt": "abandoned", "size": "512x512", "steps": 1000}  # about 10 s: far past the timeout
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if 'zimage_jobs_total{state="cancelled"}' in text and "zimage_jobs_running 0.0" in text:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned job was not cancelled")


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


BIG_TEXT = "x" * (1 << 20)
CONTROL_URL = "data:image/png;base64," + base64.b64encode(_png(Image.new("RGB", (32, 32)))).decode()


def _bomb(side: int) -> bytes:
    """A 1x1 PNG whose header claims side x side pixels (nothing to decode until it is loaded)."""
    import struct
    import zlib

    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "a", "size": "33x32"}, 400, "size"),
        ({"prompt": "a", "size": "big"}, 400, "size"),
        ({"prompt": "a", "size": "4096x4096"}, 400, "size"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": "a", "n": 99}, 400, "n"),
        ({"prompt": BIG_TEXT}, 400, "prompt"),
        ({"prompt": "a", "model": "dall-e-3"}, 404, "model"),
        ({"prompt": "a", "loras": [{"name": "nope"}]}, 400, "loras"),
        ({"prompt": "a", "loras": [{"name": "../style"}]}, 400, "loras"),
        ({"prompt": "a", "steps": 5000}, 400, "steps"),
        ({"prompt": "a", "negative_prompt": BIG_TEXT}, 400, "negative_prompt"),
        ({"prompt": "a", "guidance": 99.0}, 400, "guidance"),
        ({"prompt": "a", "guidance": -1.0}, 400, "guidance"),
        ({"prompt": "a", "unknown_field": 1}, 400, "unknown_field"),
        ({"prompt": "a", "control_image": CONTROL_URL}, 400, "control_image"),  # no --controlnet here
        ({"prompt": "a", "control_scale": 0.5}, 400, "control_scale"),
        ({"prompt": "a", "response_format": "pdf"}, 400, "response_format"),
        ({}, 400, "prompt"),
    ],
)
def test_bad_generation_requests_get_the_error_shape(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert _error(r)["param"] == param


def test_bad_json_and_oversized_body(server):
    r = httpx.post(f"{server.url}/v1/images/generations", content=b"{not json",
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    r = httpx.post(f"{server.url}/v1/images/generations", content=b"x" * (33 << 20),
                   headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == 413 and _error(r)["code"] == "body_too_large"


def test_bad_edits_get_the_error_shape(server):
    url = f"{server.url}/v1/images/edits"
    good = _png(Image.new("RGB", (32, 32), "red"))
    cases = [
        ({"image": ("a.txt", b"just some text", "text/plain")}, "image", "invalid_image"),
        ({"image": ("bomb.png", _bomb(40000), "image/png")}, "image", "image_too_large"),  # PIL's own bound
        ({"image": ("bomb.png", _bomb(5000), "image/png")}, "image", "image_too_large"),  # the server's
        ({"image": ("a.png", good, "image/png"),
          "mask": ("m.png", _png(Image.new("RGBA", (16, 16))), "image/png")}, "mask", "mask_size_mismatch"),
        ({"image": ("a.png", good, "image/png"),
          "mask": ("m.png", _png(Image.new("L", (32, 32))), "image/png")}, "mask", "invalid_mask"),
        ({}, "image", "missing"),
    ]  # fmt: skip
    for files, param, code in cases:
        r = httpx.post(
            url, data={"prompt": "x"}, files=files or {"other": ("o", b"", "text/plain")}, timeout=30
        )
        assert r.status_code == 400, r.text
        err = _error(r)
        assert (err["param"], err["code"]) == (param, code)
    assert httpx.get(f"{server.url}/ready").status_code == 200  # still serving


def test_jobs_errors(server):
    assert _error(httpx.get(f"{server.url}/v1/jobs/job_nope"))["code"] == "job_not_found"
    r = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "a", "image": "not base64!"})
    assert r.status_code == 400 and _error(r)["param"] == "image"
    r = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "a", "strength": 0.5})
    assert r.status_code == 400 and _error(r)["param"] == "image"
    assert _error(httpx.get(f"{server.url}/v1/nothing"))["code"] == "not_found"


def test_api_key_is_required_and_compared(tiny, tmp_path):
    args = ["--api-key", "s3cret", "--size", "16x16", "--steps", "1", "--cors-origin", "http://page.test"]
    with live_server(tiny, tmp_path, *args) as live:
        assert httpx.get(f"{live.url}/health").status_code == 200
        cors = httpx.get(f"{live.url}/health", headers={"Origin": "http://page.test"})
        assert cors.headers["access-control-allow-origin"] == "http://page.test"
        other = httpx.get(f"{live.url}/health", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        body = {"prompt": "a"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{live.url}/v1/images/generations", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert len(client.images.generate(prompt="a").data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0).models.list()


def test_non_loopback_bind_without_a_key_is_refused(tiny, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "zimage_lite.cli", "serve", "--model", str(tiny), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--api-key" in r.stderr
