"""The GPU acceptance command's dry run: the whole flow on the CPU with the tiny model, as CI runs it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run(out: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc.returncode, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    code, summary = run(tmp_path / "out")
    checks = {c["name"]: c for c in summary["checks"]}
    assert code == 0 and summary["passed"], [c for c in summary["checks"] if c["status"] != "pass"]
    assert summary["kernel_mode"] == checks["kernel mode"]["data"]["mode"] == "interpreted"
    assert checks["gpu-marked tests"]["data"]["ran"] >= 1
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu-marked test runs")
def test_tests_step_fails_when_every_test_was_skipped(gpu_check, tmp_path):
    """Only gpu-marked tests on a machine without CUDA: pytest exits 0 with all skipped, the step fails."""
    s = dataclasses.replace(gpu_check.DRY, tests=("-m", "gpu", "tests/test_kernel_mode.py"))
    check = gpu_check.tests_check(s, tmp_path, gpu_check.Clock(300), tmp_path / "log.txt")
    assert check.status == "fail" and "every test was skipped" in check.detail
    assert check.data["ran"] == 0 and check.data["skipped"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles: the case cannot be made there")
def test_interpreted_kernels_fail_the_gpu_settings(gpu_check):
    """What runs here (the interpreter, set by conftest and passed on) is a failure under REAL settings."""
    check = gpu_check.kernel_mode_check(gpu_check.REAL, gpu_check.Clock(300))
    assert check.status == "fail" and check.data["mode"] == "interpreted"
    assert gpu_check.kernel_mode_check(gpu_check.DRY, gpu_check.Clock(300)).status == "pass"
