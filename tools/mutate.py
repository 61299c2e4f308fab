"""Mutation testing in slices: `make mutate` (not in CI; lora, quant and models take 6-35 minutes each here).

    python tools/mutate.py                       # every slice
    python tools/mutate.py sampling planner      # some slices
    python tools/mutate.py quant --time-limit 900 --out /tmp/mutate

Each slice mutates a few modules and runs only the test files that exercise them, in its own copy of
the working tree (`<out>/<slice>/`), with mutmut (3.x) and one worker by default: the base settings are
`[tool.mutmut]` in pyproject.toml; this script adds the slice's `only_mutate` and test selection to the
copy's pyproject. A slice stopped at its time limit keeps the verdicts it reached (mutmut records each
mutant as it goes); the rest count as "not checked". Per slice it writes `<out>/<slice>.json` (mutmut's
counts and the kill rate over the mutants checked) and `<out>/<slice>-survivors.txt`; `mutmut show
<name>` inside `<out>/<slice>/` prints a mutant's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# slice -> (modules to mutate, test files that exercise them)
SLICES: dict[str, tuple[list[str], list[str]]] = {
    "sampling": (["zimage_lite/sampling.py"], ["tests/test_sampling.py", "tests/test_published_configs.py"]),
    "planner": (
        ["zimage_lite/runtime/planner.py"],
        ["tests/test_runtime_planner.py", "tests/test_planner_measured.py"],
    ),
    "lora": (["zimage_lite/weights/lora.py"], ["tests/test_lora.py", "tests/test_lora_read.py"]),
    "quant": (
        [
            "zimage_lite/quant/kquants.py",
            "zimage_lite/quant/legacy.py",
            "zimage_lite/quant/fp8.py",
            "zimage_lite/quant/formats.py",
        ],
        [
            "tests/test_quant_formats.py",
            "tests/test_quant_ggml.py",
            "tests/test_quant_device.py",
            "tests/test_convert_imatrix.py",
        ],
    ),  # fmt: skip
    "models": (
        ["zimage_lite/models/*"],
        [
            "tests/test_dit.py",
            "tests/test_qwen3.py",
            "tests/test_vae.py",
            "tests/test_dit_attention_mask.py",
            "tests/test_fp16.py",
            "tests/test_controlnet.py",
            "tests/test_controlnet_plan.py",
            "tests/test_models_device.py",
        ],
    ),  # fmt: skip
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def prepare(copy: Path, modules: list[str], tests: list[str]) -> None:
    """A fresh copy of the working tree whose pyproject names the slice."""
    if copy.exists():
        shutil.rmtree(copy)
    for name in tracked_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    tests = [t for t in tests if (copy / t.split("::")[0]).is_file()]
    with (copy / "pyproject.toml").open("a") as f:
        f.write(
            f"only_mutate = {json.dumps(modules)}\npytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        )


def counts(copy: Path, env: dict) -> dict:
    subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=copy, env=env,
                   capture_output=True, check=True)  # fmt: skip
    stats = json.loads((copy / "mutants" / "mutmut-cicd-stats.json").read_text())
    checked = sum(stats.get(k, 0) for k in ("killed", "survived", "timeout", "suspicious", "segfault"))
    caught = sum(stats.get(k, 0) for k in ("killed", "timeout", "segfault"))
    stats["kill_rate_of_checked"] = round(caught / checked, 3) if checked else None
    return stats


def run_slice(name: str, out: Path, workers: int, limit_s: float) -> dict:
    modules, tests = SLICES[name]
    copy = out / name
    prepare(copy, modules, tests)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/ first
    # mutmut forks a child per mutant from a parent that has run torch: an OpenMP pool made before the
    # fork deadlocks the child (seen: a LoRA mutant idle at 0% CPU for minutes). One thread makes no pool.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = (out / f"{name}.log").open("w")
    # its own process group: at the time limit the forked test workers stop too (they outlive mutmut else)
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(workers)], cwd=copy,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=limit_s)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        finished = False
    stats = {"slice": name, "modules": modules, "tests": tests, "finished": finished, **counts(copy, env)}
    results = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=copy, env=env,
                             capture_output=True, text=True).stdout  # fmt: skip
    (out / f"{name}-survivors.txt").write_text(results)
    (out / f"{name}.json").write_text(json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("slices", nargs="*", help=f"default: all of {', '.join(SLICES)}")
    parser.add_argument("--out", default="out/mutate", help="work and results folder")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds per slice")
    args = parser.parse_args(argv)
    unknown = set(args.slices) - set(SLICES)
    if unknown:
        parser.error(f"unknown slice(s) {', '.join(sorted(unknown))}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in args.slices or SLICES:
        stats = run_slice(name, out, args.workers, args.time_limit)
        print(json.dumps({k: stats.get(k) for k in ("slice", "finished", "total", "killed", "survived",
                                                     "timeout", "not_checked", "kill_rate_of_checked")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
