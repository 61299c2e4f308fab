"""The server's state: engine, worker, jobs, files, metrics; how one job runs on the worker thread."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.files import FileStore
from zimage_lite.serve.jobs import Job, JobStore
from zimage_lite.serve.metrics import Metrics
from zimage_lite.serve.outputs import results
from zimage_lite.serve.worker import Worker, check_between_steps

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.started = time.time()
        self.engine = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.metrics.queue_max.set(config.max_queue)
        self._tmp = None
        out = config.output_dir
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="zimage-serve-")
            out = Path(self._tmp.name)
        self.files = FileStore(out, config.file_ttl_s)
        self.jobs = JobStore(keep_s=config.file_ttl_s)
        self.worker = None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def attach(self, engine) -> None:
        """Serve `engine`: as many worker threads as it runs jobs at once (`engine.slots`)."""
        self.worker = Worker(
            self.run_job, self.config.max_queue, self._queue_changed, self._done, engine.slots
        )
        self.engine = engine
        self.metrics.ready.set(1)
        self.worker.start()

    def _queue_changed(self) -> None:
        self.metrics.queue_depth.set(self.worker.depth())
        self.metrics.queue_high_water.set(self.worker.max_depth_seen)

    def submit(self, job: Job) -> None:
        from zimage_lite.serve.errors import ApiError, unavailable

        if self.engine is None:
            self.metrics.rejected.labels("not_ready").inc()
            raise unavailable(self.load_error or "the model is still loading", "not_ready")
        try:
            self.worker.submit(job)
        except ApiError as err:
            self.metrics.rejected.labels(err.code or str(err.status)).inc()
            raise

    def offer(self):
        from zimage_lite.serve.schemas import Offer

        e = self.engine
        info = e.info()
        steps = self.config.default_steps or info["model_defaults"]["steps"]
        return Offer(e.model_id, frozenset(e.loras.names()), steps, info["controlnet"])

    def params(self, req, images: dict | None = None):
        """(JobParams, OutputSpec) for a request, or ApiError."""
        from zimage_lite.serve.schemas import to_params

        return to_params(req, self.config, self.offer(), images)

    def run_job(self, job: Job) -> None:
        """On the worker thread: generate, record the stats, encode and keep the outputs."""
        engine, m = self.engine, self.metrics

        def on_step(pass_index: int, i: int, n: int) -> None:
            job.publish(step=i + 1, steps=n, pass_index=pass_index)
            check_between_steps(job)

        m.running.inc()
        start = time.perf_counter()
        try:
            images = engine.run(job.params, on_step)
            job.replica = engine.last_replica()
        finally:
            m.running.dec()
            m.record_stats(engine.stats())
            m.record_caches(engine.caches())
        m.job_seconds.observe(time.perf_counter() - start)
        m.images.inc(len(images))
        meta = engine.metadata(job.params)
        job.results = results(images, job.output, meta, self.files, job.keep_files)
        if self.config.verbose:
            log.info("job %s: %r, %d image(s)", job.id, job.params.prompt, len(images))

    def _done(self, job: Job) -> None:
        self.metrics.jobs.labels(job.state).inc()

    def drain(self) -> None:
        if self.worker is not None:
            self.worker.drain(self.config.grace_s)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
