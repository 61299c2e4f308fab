"""GPU acceptance check: one short device session proves that zimage-lite works on a card, inside it.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check   # on a CUDA machine, < 8 min
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check          # the same flow on the CPU

Steps, each a subprocess with the time that is left (`--time-limit`, default 480 s; what does not start
in time is reported as "not run", and the script still writes its results):
0. the Triton kernel mode the commands below run with ("compiled" / "interpreted"): on a GPU anything
   but "compiled" fails (TRITON_INTERPRET=1 would run every kernel in Triton's CPU interpreter);
1. the gpu-marked tests (`pytest -m gpu`), which pass only when some test ran and none failed (all
   skipped, e.g. torch without CUDA, is a failure); the dry run runs the kernel-mode tests instead, whose
   CPU test runs there;
2. a synthetic full-size model in BF16, its values drawn on the GPU (`zimage-lite synthetic --device cuda`);
3. `zimage-lite bench` at 1024x1024: bf16 (the reference, resident), q8_0 and q4_k_m, each resident and
   as on 4, 6 and 8 GB cards (`--card`), plus diffusers' rows (resident and group offload) when
   diffusers is installed; the conversions happen inside it (cached, timed);
4. one `generate --card 6GB --stats` on q4_k_m for the per-phase device memory.
Then a pass/fail table: every card row ran with its peak inside the card (or was refused up front for
want of memory, as bf16 on 4 GB must be), the resident rows reloaded nothing for their second image,
every phase of the card run gave its memory back. `summary.json` and `summary.md` hold it, beside the
bench report.

The dry run uses the tiny model on the CPU, 64x64 and tiny cards, so CI runs the whole flow in seconds.
On the lent H200 the image lacks gguf and diffusers: carry them as wheels (device README) and put them
on PYTHONPATH before running this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "zimage_lite.cli"]


@dataclass(frozen=True)
class Settings:
    size: str  # synthetic model size
    device: str
    width: int
    cards: tuple[str, ...]
    card_for_stats: str
    tests: tuple[str, ...]  # pytest arguments of the tests step
    kernel_mode: str | None  # the Triton mode required (None: reported, not judged)
    precisions: tuple[str, ...] = ("bf16", "q8_0", "q4_k_m")


REAL = Settings("full", "cuda", 1024, ("4GB", "6GB", "8GB"), "6GB", ("-m", "gpu", "tests"), "compiled")
# 2 MB: below the transformer's minimum. The gpu-marked tests all skip on the CPU, so the dry run runs the
# kernel-mode tests, whose CPU half runs: the step's "nothing ran" rule is exercised either way.
DRY = Settings("tiny", "cpu", 64, ("2MB", "6MB"), "6MB", ("tests/test_kernel_mode.py",), None)


@dataclass
class Check:
    name: str
    status: str = "not run"  # pass | fail | not run
    detail: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


class Clock:
    def __init__(self, limit_s: float):
        self.end = time.monotonic() + limit_s

    def left(self) -> float:
        return self.end - time.monotonic()


def step_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_step(check: Check, cmd: list[str], clock: Clock, log: Path) -> bool:
    """Run `cmd` with the time left; its output goes to `log`. True when it exited 0."""
    if clock.left() < 5:
        check.detail = "time limit reached before this step"
        return False
    start = time.monotonic()
    env = step_env()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=clock.left(), env=env
            )
            ok = proc.returncode == 0
            check.detail = "" if ok else f"exit code {proc.returncode} (see {log.name})"
        except subprocess.TimeoutExpired:
            ok, check.detail = False, "stopped at the time limit"
    check.seconds = round(time.monotonic() - start, 1)
    check.status = "pass" if ok else "fail"
    return ok


def kernel_mode_check(s: Settings, clock: Clock) -> Check:
    """The Triton mode of a process started as the steps are (same environment): a GPU must compile."""
    check = Check("kernel mode")
    if clock.left() < 5:
        check.detail = "time limit reached before this step"
        return check
    code = "from zimage_lite.kernels import kernel_mode; print(kernel_mode())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=step_env(), capture_output=True,
                          text=True, timeout=max(clock.left(), 1))  # fmt: skip
    mode = proc.stdout.strip() if proc.returncode == 0 else f"error: {proc.stderr.strip()[-200:]}"
    check.data = {"mode": mode}
    if s.kernel_mode is None:
        check.status, check.detail = "pass", f"{mode} (not judged on the CPU)"
    else:
        ok = mode == s.kernel_mode
        check.status = "pass" if ok else "fail"
        check.detail = mode if ok else f"{mode}, must be {s.kernel_mode} (is TRITON_INTERPRET=1 set?)"
    return check


def tests_check(s: Settings, out: Path, clock: Clock, log: Path) -> Check:
    """The tests step passes when pytest exits 0 and at least one test ran (not all skipped)."""
    check = Check("gpu-marked tests")
    junit = out / "tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *s.tests]
    if not run_step(check, cmd, clock, log) or not junit.is_file():
        return check
    suites = list(ET.parse(junit).getroot().iter("testsuite"))
    total = {k: sum(int(t.get(k, 0)) for t in suites) for k in ("tests", "skipped", "failures", "errors")}
    ran = total["tests"] - total["skipped"]
    check.data = {**total, "ran": ran}
    check.detail = f"{ran} ran, {total['skipped']} skipped"
    if ran < 1:
        check.status, check.detail = (
            "fail",
            f"every test was skipped ({total['skipped']}): nothing was checked",
        )
    return check


def card_bytes(card: str) -> int:
    from zimage_lite.runtime.budget import parse_vram

    return parse_vram(card)


def judge_bench(report: dict, s: Settings) -> list[Check]:
    """Card rows inside their card (or refused up front); resident rows reload nothing."""
    from zimage_lite.runtime.budget import CARD_CONTEXT_BYTES

    context = CARD_CONTEXT_BYTES if s.device == "cuda" else 0
    checks = []
    for row in report["rows"]:
        if row["kind"] != "zimage-lite":
            ok = row["status"] in ("ok", "skipped")
            checks.append(Check(f"bench {row['name']}", "pass" if ok else "fail", row.get("reason") or ""))
            continue
        card = (row.get("vram_cap") or {}).get("card")
        peak, h2d = row["memory"]["peak_vram_bytes"], row["memory"]["h2d_bytes_per_image"]
        if card is None:
            ok = row["status"] == "ok" and h2d == 0
            detail = f"h2d per timed image {h2d}; peak {peak}"
        elif row["status"] == "ok":
            ok = peak is not None and peak + context <= card_bytes(card)
            detail = f"peak {peak} + context {context} <= {card_bytes(card)}"
        else:
            ok = "below the minimum" in (row.get("reason") or "")  # refused up front: the right answer
            detail = row.get("reason") or ""
        t = row["timing"]["s_per_image_median"]
        checks.append(
            Check(f"bench {row['name']}", "pass" if ok else "fail", detail, data={"s_per_image": t})
        )
    return checks


def judge_stats(stats: dict, card: str, s: Settings) -> Check:
    from zimage_lite.runtime.budget import CARD_CONTEXT_BYTES

    context = CARD_CONTEXT_BYTES if s.device == "cuda" else 0
    memory = stats.get("device_memory", {})
    inside = all(m["peak"] + context <= card_bytes(card) for m in memory.values())
    keep = stats.get("streaming", {}).get("plans", {}).get("keep")
    given_back = keep or all(m["after"] <= m["before"] for m in memory.values())
    ok = bool(memory) and inside and given_back
    return Check(f"generate --card {card} phases", "pass" if ok else "fail", json.dumps(memory), data=memory)


def write_summary(out: Path, checks: list[Check], s: Settings, started: float) -> bool:
    passed = all(c.status == "pass" for c in checks)
    mode = next((c.data.get("mode") for c in checks if c.name == "kernel mode"), None)
    summary = {
        "settings": s.__dict__, "passed": passed, "seconds": round(time.monotonic() - started, 1),
        "kernel_mode": mode, "checks": [c.__dict__ for c in checks],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list))
    lines = ["| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.seconds} | {c.detail[:160]} |" for c in checks]
    table = "\n".join(lines)
    (out / "summary.md").write_text(
        f"# GPU check ({s.device}, {s.size} model, Triton kernels {mode})\n\n{table}\n"
    )
    print(table)
    print(
        f"{'PASSED' if passed else 'FAILED'} in {summary['seconds']} s (Triton kernels {mode}); results in {out}"
    )
    return passed


def bench_checks(model: Path, cache: Path, bench: Path, s: Settings, clock: Clock, log: Path) -> list[Check]:
    """Run the bench; it exits 1 when a row failed, which the row checks judge (a refusal can be right)."""
    run = Check("bench")
    cmd = [*CLI, "bench", "--model", str(model), "--precisions", ",".join(s.precisions),
           "--card", ",".join(s.cards), "--baselines", "diffusers", "--prompts", "1", "--warmup", "1",
           "--repeats", "1", "--width", str(s.width), "--height", str(s.width), "--device", s.device,
           "--cache", str(cache), "--out", str(bench), "--no-images", "-q"]  # fmt: skip
    run_step(run, cmd, clock, log)
    report = bench / "report.json"
    if not report.is_file():
        return [run]
    run.status, run.detail = "pass", "report written"
    return [run, *judge_bench(json.loads(report.read_text()), s)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu-check", help="results folder")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="the same flow on the CPU, tiny model")
    parser.add_argument("--work", help="folder for the model and converted caches (default: under --out)")
    args = parser.parse_args(argv)
    s = DRY if args.dry_run else REAL
    started, clock = time.monotonic(), Clock(args.time_limit)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    log = out / "log.txt"
    model, cache, bench = work / f"synthetic-{s.size}", work / "cache", out / "bench"

    mode = kernel_mode_check(s, clock)
    tests = tests_check(s, out, clock, log)
    synth = Check("synthetic model")
    if model.is_dir():
        synth.status, synth.detail = "pass", "reused"
    else:
        cmd = [*CLI, "synthetic", str(model), "--size", s.size, "--dtype", "bfloat16", "--device", s.device]
        run_step(synth, cmd, clock, log)
    checks = [mode, tests, synth]
    if synth.status == "pass":
        checks += bench_checks(model, cache, bench, s, clock, log)
    from zimage_lite.bench.sources import converted_path

    q4 = converted_path(model, "q4_k_m", cache)
    stats = Check(f"generate --card {s.card_for_stats}")
    checks.append(stats)
    if q4.is_dir():
        cmd = [*CLI, "generate", "a lighthouse at dusk", "--model", str(q4), "--card", s.card_for_stats,
               "--width", str(s.width), "--height", str(s.width), "--device", s.device, "-q",
               "-o", str(out / "card.png"), "--stats", str(out / "card-stats.json")]  # fmt: skip
        if run_step(stats, cmd, clock, log):
            checks.append(judge_stats(json.loads((out / "card-stats.json").read_text()), s.card_for_stats, s))
    return 0 if write_summary(out, checks, s, started) else 1


if __name__ == "__main__":
    sys.exit(main())
