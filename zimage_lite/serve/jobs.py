"""A job: one request's params, its state as the worker moves it along, and the wake-ups of whoever
waits on it (a synchronous route, an SSE stream) in their event loops.

States: queued -> running -> succeeded | failed | cancelled (queued may go straight to the last two).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field

from zimage_lite.serve.params import JobParams, OutputSpec

FINAL = ("succeeded", "failed", "cancelled")


@dataclass(eq=False)
class Job:
    params: JobParams
    output: OutputSpec
    timeout_s: float
    keep_files: bool = False  # the jobs API keeps every image as a file; synchronous routes only for urls
    id: str = field(default_factory=lambda: "job_" + secrets.token_hex(12))
    created: float = field(default_factory=time.time)
    state: str = "queued"
    position: int | None = None  # 0 = next in the queue
    step: int = 0
    steps: int = 0
    pass_index: int = 1
    started: float | None = None
    finished: float | None = None
    results: list[dict] = field(default_factory=list)
    error: dict | None = None
    replica: str | None = None  # the Ray replica that ran it (None: this process)
    status: int = 200  # the HTTP status a synchronous route answers with
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"  # or "shutting_down": a drain ran out of grace
    version: int = 0
    _waiters: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def publish(self, **changes) -> None:
        """Apply `changes` and wake every waiter (from any thread)."""
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def fail(self, status: int, message: str, code: str, kind: str = "server_error") -> None:
        state = "cancelled" if code == "cancelled" else "failed"
        error = {"message": message, "type": kind, "param": None, "code": code}
        self.publish(state=state, error=error, status=status, finished=time.time(), position=None)

    async def changed(self, seen: int) -> int:
        """Wait until the version is past `seen`; returns the new version."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.version > seen:
                return self.version
            fut = loop.create_future()
            self._waiters.append((loop, fut))
        await fut
        return self.version

    async def wait_done(self) -> None:
        seen = -1
        while not self.done:
            seen = await self.changed(seen)

    def snapshot(self) -> dict:
        """GET /v1/jobs/{id}: a JSON view (results carry file urls and ids; base64 is left out)."""
        out = {
            "id": self.id, "object": "job", "state": self.state, "created": int(self.created),
            "position": self.position, "step": self.step, "steps": self.steps, "pass": self.pass_index,
            "passes": self.params.passes(), "seed": self.params.seed,
            "size": f"{self.params.width}x{self.params.height}", "n": self.params.n,
        }  # fmt: skip
        if self.started is not None:
            out["started"] = self.started
        if self.finished is not None:
            out["finished"] = self.finished
        if self.results:
            out["results"] = [{k: v for k, v in r.items() if k != "b64_json"} for r in self.results]
        if self.error is not None:
            out["error"] = self.error
        if self.replica is not None:
            out["replica"] = self.replica
        return out


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class JobStore:
    """Jobs by id. Finished ones are kept `keep_s` seconds (at most `max_kept` of them) for GET, then
    dropped; a synchronous route removes its own job when it has answered."""

    def __init__(self, keep_s: float = 3600.0, max_kept: int = 1000):
        self.keep_s = keep_s
        self.max_kept = max_kept
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._prune()
            self.jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def remove(self, job: Job) -> None:
        with self._lock:
            self.jobs.pop(job.id, None)

    def _prune(self) -> None:
        now = time.time()
        finished = [j for j in self.jobs.values() if j.done and j.finished is not None]
        finished.sort(key=lambda j: j.finished)
        extra = len(finished) - self.max_kept
        for i, job in enumerate(finished):
            if i < extra or now - job.finished > self.keep_s:
                del self.jobs[job.id]
