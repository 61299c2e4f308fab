"""The GPU acceptance command's dry run: the whole flow on the CPU with the tiny model, as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def run(out: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc.returncode, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    code, summary = run(tmp_path / "out")
    checks = {c["name"]: c for c in summary["checks"]}
    assert code == 0 and summary["passed"], [c for c in summary["checks"] if c["status"] != "pass"]
    assert "below the minimum" in checks["bench bf16@2MB"]["detail"]  # refused up front, as it should
    assert checks["bench q4_k_m@6MB"]["status"] == "pass"
    phases = checks["generate --card 6MB phases"]["data"]
    assert set(phases) == {"text_encoder", "transformer", "vae"}
    assert (tmp_path / "out" / "bench" / "report.md").is_file() and (
        tmp_path / "out" / "summary.md"
    ).is_file()


def test_time_limit_stops_cleanly(tmp_path):
    code, summary = run(tmp_path / "out", "--time-limit", "1")
    assert code == 1 and not summary["passed"]
    assert all(c["status"] in ("not run", "fail") for c in summary["checks"])
    assert not (tmp_path / "out" / "work").exists()  # nothing was started
