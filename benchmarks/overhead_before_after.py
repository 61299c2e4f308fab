"""What a change costs: `generate_overhead.py` (zimage-lite only) against two checkouts, alternating.

Each round runs one process per checkout (PYTHONPATH set to it, the order flipped every round, so slow
spells of a shared machine hit both), each timing `--repeats` generations after a warm-up; the report is
the median over all timed generations per checkout, per dtype, and the ratio after / before. Run:

    python benchmarks/overhead_before_after.py --before /work/main --after . --dtypes float32,bfloat16 \\
        --rounds 5 --out benchmarks/results/fp16-overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("generate_overhead.py")


def one_run(checkout: Path, dtype: str, args) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    cmd = [sys.executable, str(SCRIPT), "--no-diffusers", "--dtype", dtype, "--model-size", args.model_size,
           "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{") :])["all_s"]["zimage_lite"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--model-size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    result = {"what": f"{args.model_size} synthetic model, {args.size}x{args.size}, {args.steps} steps, CPU",
              "before": str(args.before), "after": str(args.after), "load_avg_start": os.getloadavg(),
              "dtypes": {}}  # fmt: skip
    for dtype in args.dtypes.split(","):
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for which in order:
                times[which] += one_run(getattr(args, which), dtype, args)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["dtypes"][dtype] = {"median_s": med, "ratio_after_over_before": med["after"] / med["before"],
                                   "all_s": times}  # fmt: skip
        print(dtype, json.dumps(med), f"ratio {med['after'] / med['before']:.3f}", file=sys.stderr)
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
