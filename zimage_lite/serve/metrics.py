"""Prometheus metrics in the server's own registry (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "zimage_queue_depth", "jobs waiting (the running one not counted)", registry=r
        )
        self.queue_high_water = Gauge("zimage_queue_high_water", "the most jobs ever waiting at once",
                                      registry=r)  # fmt: skip
        self.queue_max = Gauge("zimage_queue_max", "the queue's bound (--max-queue)", registry=r)
        self.running = Gauge("zimage_jobs_running", "jobs on the device (0 or 1)", registry=r)
        self.images = Counter("zimage_images", "images generated", registry=r)
        self.jobs = Counter("zimage_jobs", "jobs finished, by final state", ["state"], registry=r)
        self.rejected = Counter("zimage_rejected", "requests refused before queueing", ["reason"], registry=r)
        self.step_seconds = Histogram("zimage_step_seconds", "seconds per denoising step", buckets=STEP_BUCKETS,
                                      registry=r)  # fmt: skip
        self.job_seconds = Histogram("zimage_job_seconds", "seconds per job on the device", registry=r)
        self.phase_seconds = Gauge(
            "zimage_phase_seconds", "last job's seconds per phase", ["phase"], registry=r
        )
        self.device_bytes = Gauge("zimage_phase_device_bytes", "last job's device bytes per phase",
                                  ["phase", "point"], registry=r)  # fmt: skip
        self.cache = Gauge("zimage_cache_events", "reuse caches' hits and misses", ["cache", "result"],
                           registry=r)  # fmt: skip
        self.ready = Gauge("zimage_ready", "1 once the model is loaded", registry=r)

    def record_stats(self, stats) -> None:
        """A job's Pipeline.last_stats: step times, phase times, device bytes per phase."""
        for seconds in stats.steps:
            self.step_seconds.observe(seconds)
        for phase, seconds in stats.phases.items():
            self.phase_seconds.labels(phase).set(seconds)
        for phase, points in stats.device_memory.items():
            for point, value in points.items():
                self.device_bytes.labels(phase, point).set(value)

    def record_caches(self, caches: dict) -> None:
        for name, part in caches.items():
            self.cache.labels(name, "hit").set(part.hits)
            self.cache.labels(name, "miss").set(part.misses)

    def render(self) -> bytes:
        return generate_latest(self.registry)
