"""What the server adds and what its reuse saves, on the tiny synthetic model (CPU, one torch thread).

1. Server overhead per image: POST /v1/images/generations (b64_json PNG) against Pipeline.generate in
   this process, interleaved, distinct prompts (no cache hits on either side), median of N each.
2. Prompt-feature cache: Engine.run with a prompt seen before (hit) against a new one (miss).
3. Plans per size: plan_phases against a PlanCache hit.
4. LoRAs: Pipeline.load_lora (read + apply) against LoraLibrary.select of an already read file.
5. Weights once: Pipeline.load, which `generate` pays per image and `serve` once.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/serve_overhead.py [--n 50] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.serve_live import live_server, write_lora  # noqa: E402
from zimage_lite.pipeline import Pipeline  # noqa: E402
from zimage_lite.serve.config import ServeConfig  # noqa: E402
from zimage_lite.serve.engine import Engine  # noqa: E402
from zimage_lite.serve.params import JobParams, LoraChoice  # noqa: E402
from zimage_lite.synthetic import write_synthetic_model  # noqa: E402

SIZE, STEPS = 32, 2


def ms(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values) * 1e3, 3), "n": len(values),
            "min_ms": round(min(values) * 1e3, 3), "max_ms": round(max(values) * 1e3, 3)}  # fmt: skip


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def _post(client: httpx.Client, body: dict) -> None:
    client.post("/v1/images/generations", json=body).raise_for_status()


def _quiet(*step) -> None:
    pass


def overhead(pipe, url: str, n: int) -> dict:
    client = httpx.Client(base_url=url, timeout=120)
    direct, served = [], []
    for i in range(n + 3):  # 3 warm-up rounds, dropped
        prompt = f"overhead prompt number {i}"
        d = timed(pipe.generate, prompt + " direct", seed=i, steps=STEPS, width=SIZE, height=SIZE)
        body = {"prompt": prompt + " served", "size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": i}
        s = timed(_post, client, body)
        if i >= 3:
            direct.append(d)
            served.append(s)
    diffs = [s - d for s, d in zip(served, direct)]
    return {"pipeline_generate": ms(direct), "server_request": ms(served), "per_image_overhead": ms(diffs)}


def prompt_cache(engine: Engine, n: int) -> dict:
    hit, miss, hit_te, miss_te = [], [], [], []
    base = JobParams("the same prompt every time", SIZE, SIZE, 0, STEPS)
    engine.run(base, lambda *a: None)
    for i in range(n):
        new = JobParams(f"a new prompt {i}", SIZE, SIZE, i, STEPS)
        miss.append(timed(engine.run, new, _quiet))
        miss_te.append(engine.stats().phases["text_encoder"])
        hit.append(timed(engine.run, base, _quiet))
        hit_te.append(engine.stats().phases["text_encoder"])
        assert "text_encoder" not in engine.stats().device_memory  # the phase did not place its weights
    return {"miss_total": ms(miss), "hit_total": ms(hit), "miss_text_encoder_phase": ms(miss_te),
            "hit_text_encoder_phase": ms(hit_te)}  # fmt: skip


def plans(pipe, engine: Engine, n: int) -> dict:
    kw = dict(width=SIZE, height=SIZE, images=1, caption_tokens=40, dtype=pipe.dtype)
    models = (pipe.text_encoder, pipe.transformer, pipe.vae, pipe.budget, pipe.device)
    inner = engine.plans.plan
    engine.plans(*models, **kw)
    fresh = [timed(lambda: inner(*models, **kw)) for _ in range(n)]
    cached = [timed(lambda: engine.plans(*models, **kw)) for _ in range(n)]
    return {"plan_phases": ms(fresh), "cache_hit": ms(cached)}


def loras(model: Path, engine: Engine, folder: Path, n: int) -> dict:
    pipe = engine.pipe
    load, switch = [], []
    for _ in range(n):
        load.append(timed(lambda: pipe.load_lora(folder / "style.safetensors", 0.8)))
        pipe.unload_loras()
        engine.loras.current = ()
        switch.append(timed(lambda: engine.loras.select((LoraChoice("style", 0.8),), pipe.set_loras)))
        engine.loras.select((), pipe.set_loras)
    return {"load_lora_read_and_apply": ms(load), "select_already_read": ms(switch),
            "file_reads": engine.loras.misses}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_synthetic_model(tmp / "tiny", "tiny", seed=0)
        loads = [Pipeline.load(model, device="cpu").load_seconds for _ in range(5)]
        pipe = Pipeline.load(model, device="cpu")
        (tmp / "loras").mkdir()
        write_lora(pipe.transformer, tmp / "loras" / "style.safetensors", ("attention.to_q",), seed=1)
        result = {"machine": {"load_avg": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": 1},
                  "size": f"{SIZE}x{SIZE}", "steps": STEPS, "pipeline_load_s": statistics.median(loads)}  # fmt: skip
        with live_server(model, tmp, "--size", f"{SIZE}x{SIZE}") as live:
            result["overhead"] = overhead(pipe, live.url, args.n)
        engine = Engine.around(Pipeline.load(model, device="cpu"), ServeConfig(lora_dir=tmp / "loras"))
        result["prompt_cache"] = prompt_cache(engine, min(args.n, 20))
        result["plans"] = plans(engine.pipe, engine, min(args.n, 20))
        result["loras"] = loras(model, engine, tmp / "loras", min(args.n, 10))
        result["machine"]["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
