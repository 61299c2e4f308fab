"""`make demo` installs only what the program needs; the program runs without the test extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("diffusers", "transformers", "peft", "skimage", "pytest", "hypothesis")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_the_package_without_the_test_extra(tmp_path):
    def planned(target: str) -> list[str]:  # make -n: the commands, none run
        venv = tmp_path / target
        out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "pip install" in line]

    demo, test = planned("demo"), planned("test")
    assert any(line.rstrip().endswith("install -q -e .") for line in demo), demo
    assert not any("[test]" in line for line in demo), demo
    assert any('-e ".[test]"' in line for line in test), test


def test_generate_and_bench_run_without_the_test_extra(tmp_path):
    """The demo's commands in a process where importing any test-only package fails."""
    block = f"import sys\nfor m in {TEST_ONLY!r}: sys.modules[m] = None\nfrom zimage_lite.cli import main\n"
    model = tmp_path / "m"
    size = ["--width", "32", "--height", "32", "--steps", "1"]
    commands = [
        ["synthetic", str(model)],
        ["generate", "x", "--model", str(model), *size, "-o", str(tmp_path / "a.png"), "-q"],
        ["bench", "--synthetic", "tiny", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"), *size,
         "--prompts", "1", "--warmup", "0", "--precisions", "bf16,q8_0", "-q"],
    ]  # fmt: skip
    for argv in commands:
        code = block + f"sys.exit(main({argv!r}))\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (argv[0], proc.stderr)
    assert (tmp_path / "a.png").is_file() and (tmp_path / "r" / "report.json").is_file()
