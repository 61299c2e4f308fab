"""A bounded load test of a live server on the tiny model: 200 requests from 16 concurrent clients with
--max-queue 4 (each ends in a valid image or a 429, none is lost, the queue never passes its bound), then
500 more requests with the server's RSS growth under 50 MB."""

from __future__ import annotations

import asyncio
import base64
import io
import random

import httpx
import pytest
from PIL import Image

from tests.serve_live import live_server
from zimage_lite.synthetic import write_synthetic_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    tiny = write_synthetic_model(tmp / "tiny", "tiny", seed=0)
    with live_server(tiny, tmp, "--max-queue", "4", "--steps", "1", "--size", "16x16") as live:
        yield live


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, int]:
    w, h = rng.choice((16, 32, 48, 64)), rng.choice((16, 32, 48, 64))
    r = await client.post(
        "/v1/images/generations", json={"prompt": f"load {i % 7}", "size": f"{w}x{h}", "seed": i}
    )
    if r.status_code == 429:
        err = r.json()["error"]
        assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        return "refused", i
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1
    assert Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (w, h)
    return "image", i


async def _run(url: str, total: int, clients: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    todo = iter(range(total))
    out: list[tuple[str, int]] = []

    async def client_loop():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for i in todo:  # a shared iterator: each request is sent by exactly one client
                out.append(await _one(client, i, rng))
                if out[-1][0] == "refused":
                    await asyncio.sleep(0.05)  # a short pause, so refusals do not drown the images

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return out


def test_200_requests_16_clients_queue_of_4(server):
    before = httpx.get(f"{server.url}/metrics").text
    results = asyncio.run(_run(server.url, 200, 16, seed=0))
    assert sorted(i for _, i in results) == list(range(200))  # every request answered once
    images = sum(kind == "image" for kind, _ in results)
    refused = len(results) - images
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "zimage_queue_high_water") <= 4
    assert metric(after, "zimage_queue_depth") == 0
    done = 'zimage_jobs_total{state="succeeded"}'
    assert metric(after, done) - metric(before, done) == images  # every accepted job finished
    rejected = 'zimage_rejected_total{reason="queue_full"}'
    assert metric(after, rejected) - metric(before, rejected) == refused
    assert images > 0 and refused > 0, (images, refused)  # 16 clients against 1 + 4 places: both happen
    print(f"load: {images} images, {refused} refused (429)")


def test_rss_grows_under_50_mb_over_500_requests(server):
    asyncio.run(_run(server.url, 50, 4, seed=1))  # warm: every size planned, allocator pools filled
    start = server.rss_bytes()
    results = asyncio.run(_run(server.url, 500, 4, seed=2))
    grown = server.rss_bytes() - start
    assert len(results) == 500
    print(f"rss: {start / 2**20:.1f} MiB -> +{grown / 2**20:.1f} MiB over 500 requests")
    assert grown < 50 * 2**20
