"""`--replicas N`: the same FastAPI app on Ray Serve, with the device work spread over N replicas.

Two deployments: `Front` is the app (`@serve.ingress`, one CPU-less replica: routes, queue, jobs, files,
metrics, exactly as on one machine) and `Generator` holds a warm Engine per GPU (`num_gpus=1`; `num_cpus=1`
on a CPU-only cluster), one ongoing job each. The Front's worker runs up to N jobs at once, each as a
streaming call to some Generator (per-step progress flows back). A Generator that dies mid-job (its
process killed, its node lost) costs that attempt only: the job is sent again to a live replica, so no
accepted request is lost (generation is deterministic for its seed and has no side effects there).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from PIL import Image

from zimage_lite.errors import ZImageError
from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.params import JobParams

log = logging.getLogger(__name__)
ATTEMPTS = 4  # a job survives this many replica losses minus one


class GeneratorCore:
    """What a Generator replica does (kept apart from Ray so it can be read and tested alone)."""

    def __init__(self, config: ServeConfig):
        from zimage_lite.serve.engine import Engine
        from zimage_lite.serve.middleware import replica_id

        self.engine = Engine.load(config)
        self.replica = replica_id()

    def describe(self) -> dict:
        return {"model_id": self.engine.model_id, "info": self.engine.info(), "replica": self.replica}

    def run(self, params: JobParams):
        """Yields ("step", pass, i, n) after each step, then ("done", images as uint8 arrays, replica,
        stats, caches). The engine runs in a thread; closing this generator cancels it between steps."""
        from zimage_lite.serve.worker import Cancelled

        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_step(pass_index: int, i: int, n: int) -> None:
            if stop.is_set():
                raise Cancelled
            events.put(("step", pass_index, i, n))

        def work() -> None:
            try:
                images = self.engine.run(params, on_step)
                stats = self.engine.stats()
                caches = {k: (v.hits, v.misses) for k, v in self.engine.caches().items()}
                summary = {"phases": stats.phases, "steps": stats.steps, "device_memory": stats.device_memory}
                events.put(("done", [np.asarray(im) for im in images], self.replica, summary, caches))
            except BaseException as exc:
                events.put(("error", exc))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while True:
                event = events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "done":
                    return
        finally:
            stop.set()
            worker.join()


def _lost_replica_errors() -> tuple[type, ...]:
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    names = [(rex, "RayActorError"), (rex, "ActorUnavailableError"), (sex, "ReplicaUnavailableError"),
             (sex, "DeploymentUnavailableError")]  # fmt: skip
    return tuple(getattr(m, n) for m, n in names if hasattr(m, n))


@dataclass
class RemoteEngine:
    """The Engine interface (run, stats, caches, metadata, info) over a handle to the Generators."""

    handle: object
    model_id: str
    slots: int
    _info: dict
    _local: threading.local = field(default_factory=threading.local)

    @classmethod
    def connect(cls, handle, replicas: int) -> RemoteEngine:
        described = handle.describe.remote().result()
        return cls(handle, described["model_id"], replicas, described["info"])

    def run(self, params: JobParams, on_step) -> list[Image.Image]:
        lost = _lost_replica_errors()
        for attempt in range(1, ATTEMPTS + 1):
            stream = self.handle.options(stream=True).run.remote(params)
            finished = False
            try:
                for event in stream:
                    if event[0] == "step":
                        on_step(*event[1:])
                        continue
                    _, arrays, replica, stats, caches = event
                    finished = True
                    self._local.last = (replica, stats, caches)
                    return [Image.fromarray(a) for a in arrays]
            except lost as exc:
                log.warning("a replica was lost mid-job (attempt %d of %d): %s", attempt, ATTEMPTS, exc)
            finally:
                if not finished:
                    stream.cancel()
        raise ZImageError(f"the job lost its replica {ATTEMPTS} times; the cluster may be failing")

    def last_replica(self) -> str | None:
        last = getattr(self._local, "last", None)
        return None if last is None else last[0]

    def stats(self):
        from zimage_lite.pipeline import Stats

        last = getattr(self._local, "last", None)
        s = {} if last is None else last[1]
        return Stats(
            phases=s.get("phases", {}), steps=s.get("steps", []), device_memory=s.get("device_memory", {})
        )

    def caches(self) -> dict:
        """The last replica's counters (each replica keeps its own caches)."""
        last = getattr(self._local, "last", None)
        caches = {} if last is None else last[2]
        return {k: SimpleNamespace(hits=h, misses=m) for k, (h, m) in caches.items()}

    def metadata(self, p: JobParams) -> dict[str, str]:
        from zimage_lite.serve.engine import metadata

        return metadata(p, self.model_id, self._info["dtype"])

    def info(self) -> dict:
        return {**self._info, "replicas": self.slots}

    @property
    def loras(self):
        return SimpleNamespace(names=lambda: set(self._info["loras"]))


def build(config: ServeConfig, replicas: int, actor_options: dict, grace_s: float):
    """The Serve application: Front (the app) bound to N Generators."""
    from ray import serve

    from zimage_lite.serve.app import create_app

    generator = serve.deployment(
        GeneratorCore, name="Generator", num_replicas=replicas, ray_actor_options=actor_options,
        max_ongoing_requests=1, graceful_shutdown_timeout_s=grace_s,
    )  # fmt: skip

    @serve.deployment(name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=10000, graceful_shutdown_timeout_s=grace_s + 5)  # fmt: skip
    @serve.ingress()
    class Front:
        def __init__(self, handle):
            self.handle = handle

        def __serve_build_asgi_app__(self):
            return create_app(config, load=lambda c: RemoteEngine.connect(self.handle, replicas))

    return Front.bind(generator.bind(config))


def run_replicas(config: ServeConfig, replicas: int) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray instance, deploy, serve until SIGTERM/SIGINT, shut down."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ZImageError(
            f"--replicas needs the cluster extra: pip install 'zimage-lite[cluster]' ({exc})"
        ) from None
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    on_gpu = gpus >= 1 and config.model.device != "cpu"
    if on_gpu and gpus < replicas:
        log.warning("%d replicas on %g GPUs: the rest wait until GPUs join the cluster", replicas, gpus)
    options = {"num_gpus": 1} if on_gpu else {"num_cpus": 1}
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build(config, replicas, options, config.grace_s), name="zimage", route_prefix="/")
    print(f"serving on Ray Serve at http://{config.host}:{config.port}: {replicas} replica(s), "
          f"{'one GPU' if on_gpu else 'one CPU'} each (SIGTERM to stop)", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    serve.shutdown()
    ray.shutdown()
    time.sleep(0)
    print("stopped", flush=True)
    return 0
