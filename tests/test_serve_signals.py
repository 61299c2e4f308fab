"""SIGTERM to a live server mid-job: it stops accepting, fails the queued job with 503, lets the running
job finish within --grace (or cancels it when the grace runs out), exits 0 and leaves no partial file."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from PIL import Image

from tests.serve_live import live_server
from zimage_lite.synthetic import write_synthetic_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


def _post(url: str, body: dict, out: dict, key: str) -> None:
    try:
        out[key] = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
    except httpx.HTTPError as exc:  # recorded, so the test says what went wrong
        out[key] = exc


def _wait(url: str, pred, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if pred(httpx.get(f"{url}/v1/info", timeout=10).json()["queue"]):
            return
        time.sleep(0.05)
    raise AssertionError("the server never reached the expected queue state")


def _start_two(live, steps: int, size: str) -> tuple[dict, list[threading.Thread]]:
    """One running job (`steps` steps at `size`, kept as a url file) and one queued behind it.

    The tiny model takes about 2 ms a step at 32x32 and 10 ms at 512x512 on a 2-core CPU: the running
    job must outlast the polling below and the signal by seconds, on a faster CPU too."""
    out: dict = {}
    running = {"prompt": "running", "size": size, "steps": steps, "response_format": "url"}
    threads = [threading.Thread(target=_post, args=(live.url, running, out, "running"))]
    threads[0].start()
    _wait(live.url, lambda q: q["running"])
    threads.append(threading.Thread(target=_post, args=(live.url, {"prompt": "queued"}, out, "queued")))
    threads[1].start()
    _wait(live.url, lambda q: q["depth"] == 1)
    return out, threads


def _no_partial_files(folder) -> None:
    assert not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".part"]


def test_sigterm_lets_the_running_job_finish_and_exits_0(tiny, tmp_path):
    out_dir = tmp_path / "out"
    with live_server(
        tiny,
        tmp_path,
        "--grace",
        "120",
        "--output-dir",
        str(out_dir),
        "--size",
        "16x16",
        "--max-steps",
        "1000",
    ) as live:
        out, threads = _start_two(live, steps=400, size="512x512")
        assert live.stop(timeout=120) == 0
        for t in threads:
            t.join(120)
        assert out["queued"].status_code == 503 and out["queued"].json()["error"]["code"] == "shutting_down"
        r = out["running"]
        assert r.status_code == 200, r
        name = r.json()["data"][0]["url"].rsplit("/", 1)[1]
        assert Image.open(out_dir / name).size == (512, 512)
        assert "stopped" in live.output()
    _no_partial_files(out_dir)


def test_sigterm_cancels_the_running_job_when_the_grace_runs_out(tiny, tmp_path):
    out_dir = tmp_path / "out"
    with live_server(
        tiny, tmp_path, "--grace", "1", "--output-dir", str(out_dir), "--size", "16x16", "--max-steps", "1000"
    ) as live:
        out, threads = _start_two(live, steps=1000, size="512x512")  # ten seconds: far past the grace
        start = time.monotonic()
        assert live.stop(timeout=120) == 0
        took = time.monotonic() - start
        for t in threads:
            t.join(120)
        for key in ("running", "queued"):
            assert out[key].status_code == 503 and out[key].json()["error"]["code"] == "shutting_down"
        assert took < 60
    _no_partial_files(out_dir)
    assert list(out_dir.iterdir()) == []
