"""The transformer's forward in this checkout's model code against another git revision's, in one process.

Both models are built from the same config and share one state dict; calls alternate (A, B, B, A, ...)
so machine noise hits both; medians per dtype. This isolates model-code cost from process start-up and
machine load, which dominate end-to-end timings on a shared CPU. Run:

    python benchmarks/model_code_overhead.py --rev main --size small --tokens 1024 --dtypes float32,bfloat16,float16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def module_at(rev: str, path: str, name: str):
    """The module `path` (e.g. zimage_lite/models/dit.py) as it is at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="main", help="the revision to compare with (its models/dit.py)")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (a square latent)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.synthetic import SIZES

    cfg = SIZES[args.size]().dit
    other = module_at(args.rev, "zimage_lite/models/dit.py", "dit_other")
    side = int(args.tokens**0.5) * cfg.patch_size
    gen = torch.Generator().manual_seed(0)
    ours = ZImageDiT(cfg)
    for p in ours.parameters():  # non-degenerate values everywhere (norm weights, gates, pad tokens)
        p.data = torch.randn(p.shape, generator=gen) / max(1.0, p.shape[-1] ** 0.5)
    result = {"what": f"ZImageDiT forward, {args.size} config, {args.tokens} image tokens + 32 caption tokens, "
              f"this checkout vs {args.rev}, CPU", "load_avg": list(__import__("os").getloadavg()), "dtypes": {}}  # fmt: skip
    latents = torch.randn(1, cfg.in_channels, side, side, generator=gen)
    captions = [torch.randn(20, cfg.cap_feat_dim, generator=gen)]
    t = torch.tensor([0.4])
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        a = ZImageDiT(cfg).to(dtype)
        a.load_state_dict(ours.state_dict())
        b = other.ZImageDiT(cfg).to(dtype)
        b.load_state_dict(ours.state_dict())
        models = {"this": a.to(dtype), args.rev: b.to(dtype)}
        times = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(latents, t, [c.to(dtype) for c in captions])
            for r in range(args.repeats):
                order = list(models) if r % 2 == 0 else list(models)[::-1]
                for k in order:
                    start = time.perf_counter()
                    models[k](latents, t, [c.to(dtype) for c in captions])
                    times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["dtypes"][dtype_name] = {"median_s": med, "ratio_this_over_rev": med["this"] / med[args.rev],
                                        "all_s": times}  # fmt: skip
        print(dtype_name, json.dumps(med), f"ratio {med['this'] / med[args.rev]:.3f}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
