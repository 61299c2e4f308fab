"""The device worker: one thread owns the engine and runs jobs one at a time (diffusion does not batch
on a small card) from a bounded queue. A full queue refuses at once (429 with Retry-After); a job is
cancelled between steps (its `cancel` event, or its deadline); a drain (SIGTERM) refuses new jobs, fails
the queued ones and gives the running one `grace` seconds before cancelling it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from zimage_lite.errors import ZImageError
from zimage_lite.serve.errors import queue_full, unavailable
from zimage_lite.serve.jobs import Job

log = logging.getLogger(__name__)


class Cancelled(Exception):
    pass


class TimedOut(Exception):
    pass


def check_between_steps(job: Job) -> None:
    """Raised from the pipeline's step callback, so a cancel lands between two steps."""
    if job.cancel.is_set():
        raise Cancelled
    if time.monotonic() > job.deadline:
        raise TimedOut


class Worker:
    def __init__(
        self,
        run: Callable[[Job], None],
        max_queue: int,
        on_change: Callable[[], None] = lambda: None,
        on_done: Callable[[Job], None] = lambda job: None,
        slots: int = 1,
    ):
        self.run = run  # does the job's work and stores its results; called in the worker thread only
        self.max_queue = max_queue
        self.on_change = on_change  # queue depth moved (metrics)
        self.on_done = on_done  # a job reached its final state (metrics)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # at most `slots`: 1 on a device; N when N Ray replicas run them
        self.accepting = True
        self.max_depth_seen = 0
        self.job_seconds = 1.0  # a running estimate for Retry-After
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"zimage-worker-{i}", daemon=True) for i in range(slots)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise ApiError 429 (full) / 503 (draining)."""
        with self._cond:
            if not self.accepting:
                raise unavailable("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise queue_full(self.retry_after())
            self.waiting.append(job)
            self.max_depth_seen = max(self.max_depth_seen, len(self.waiting))
            job.position = len(self.waiting) - 1
            self._cond.notify()
        self.on_change()

    def retry_after(self) -> int:
        ahead = len(self.waiting) + len(self.running)
        return max(1, math.ceil(self.job_seconds * ahead / len(self._threads)))

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now, a running one at its next step; a finished one stays as it is."""
        job.cancel.set()
        with self._cond:
            queued = job in self.waiting
            if queued:
                self.waiting.remove(job)
        if queued:
            job.fail(499, "cancelled", "cancelled")
            self.on_done(job)
            self._positions()

    def drain(self, grace: float) -> None:
        """Stop accepting; fail what waits; cancel the running job if it is not done within `grace` s."""
        with self._cond:
            self.accepting = False
            waiting, self.waiting = list(self.waiting), deque()
            running = list(self.running)
        for job in waiting:
            job.fail(503, "the server is shutting down; the job did not start", "shutting_down")
            self.on_done(job)
        for job in running:
            timer = threading.Timer(grace, _stop_running, (job,))
            timer.daemon = True
            timer.start()
        self.on_change()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    def _positions(self) -> None:
        with self._cond:
            queued = list(self.waiting)
        for i, job in enumerate(queued):
            if job.position != i:
                job.publish(position=i)
        self.on_change()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self.waiting.popleft()
                self.running.append(job)
            self._positions()
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self.running.remove(job)

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        try:
            check_between_steps(job)
            job.publish(state="running", position=None, started=time.time(), steps=job.params.steps)
            self.run(job)
            job.publish(state="succeeded", finished=time.time())
        except Cancelled:
            if job.cancel_reason == "shutting_down":
                job.fail(
                    503, "the server shut down before the job finished (--grace ran out)", "shutting_down"
                )
            else:
                job.fail(499, "cancelled", "cancelled")
        except TimedOut:
            job.fail(504, f"the request ran past this server's {job.timeout_s:g} s limit", "timeout")
        except ZImageError as exc:
            job.fail(400, str(exc), "invalid_request", "invalid_request_error")
        except Exception as exc:  # out of memory, or a bug: the server keeps serving
            _failed(job, exc)
        self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - start)
        self.on_done(job)


def _failed(job: Job, exc: Exception) -> None:
    """Out of device or host memory is the machine's limit (503); anything else is a bug (500, logged)."""
    from zimage_lite.cli_errors import describe, is_device_oom, is_host_oom

    if is_device_oom(exc) or is_host_oom(exc):
        job.fail(503, describe(exc)[0], "out_of_memory")
        return
    log.exception("job %s failed", job.id)
    job.fail(500, f"internal error ({type(exc).__name__}); the server log has the details", "internal")


def _stop_running(job: Job) -> None:
    job.cancel_reason = "shutting_down"
    job.cancel.set()
