"""`zimage-lite serve --replicas 2` on a local Ray instance (CPU replicas of the tiny model): requests
spread over two replicas (two X-Zimage-Replica ids), and killing one replica's worker process mid-job
loses no accepted request: the job runs again on a live replica."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray.serve  # noqa: F401  (the [cluster] extra, part of [test]: missing means a broken install)

from tests.serve_live import live_server
from zimage_lite.synthetic import write_synthetic_model

pytestmark = pytest.mark.slow


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= new
        grew = bool(new)
    return found - {root}


def generator_pids(server_pid: int) -> list[int]:
    """The Generator replicas' processes among the server's descendants (its own Ray instance)."""
    out = []
    for pid in _descendants(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ServeReplica:zimage:Generator" in cmd:
            out.append(pid)
    return sorted(out)


def _post_many(url: str, bodies: list[dict]) -> list:
    results: list = [None] * len(bodies)

    def post(i: int) -> None:
        try:
            results[i] = httpx.post(f"{url}/v1/images/generations", json=bodies[i], timeout=240)
        except httpx.HTTPError as exc:
            results[i] = exc

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, results


@pytest.fixture()
def ray_tmp():
    """Ray's session folder (logs, sockets): a short path (unix sockets allow ~107 bytes), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="zr-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_two_replicas_and_a_killed_one_loses_nothing(tmp_path, ray_tmp):
    tiny = write_synthetic_model(tmp_path / "tiny", "tiny", seed=0)
    args = ["--replicas", "2", "--size", "16x16", "--steps", "1", "--max-steps", "1000", "--max-queue", "16"]
    with live_server(tiny, tmp_path, *args, ready_s=400, env={"RAY_TMPDIR": str(ray_tmp)}) as live:
        threads, results = _post_many(
            live.url, [{"prompt": f"p{i}", "steps": 40, "seed": i} for i in range(8)]
        )
        for t in threads:
            t.join(300)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
        replicas = {r.headers["x-zimage-replica"] for r in results}
        assert len(replicas) == 2, replicas

        pids = generator_pids(live.pid)
        assert len(pids) == 2, pids
        threads, results = _post_many(
            live.url, [{"prompt": f"k{i}", "steps": 300, "seed": i} for i in range(6)]
        )
        deadline = time.monotonic() + 300
        while httpx.get(f"{live.url}/v1/info", timeout=10).json()["queue"]["running_jobs"] < 2:
            assert time.monotonic() < deadline, "the two replicas never ran at once"
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), [
            getattr(r, "text", r) for r in results
        ]
        assert all(len(r.json()["data"]) == 1 for r in results)
        logs = "".join(p.read_text(errors="replace") for p in ray_tmp.rglob("worker-*.err"))
        assert "a replica was lost mid-job (attempt 1 of 4)" in logs  # the kill hit a running job
        assert live.stop(timeout=180) == 0
    assert generator_pids(live.pid) == []
