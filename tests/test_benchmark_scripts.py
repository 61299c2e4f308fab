"""Benchmark scripts import cleanly when run as `python benchmarks/X.py`.

Running a script puts its folder first on sys.path, so a script named like an installed distribution or
a standard-library module hides that module from everything the script imports: `benchmarks/kernels.py`
hid Hugging Face's `kernels` from diffusers (`cannot import name 'CUDAProperties' from 'kernels'`).
Each script's imports, including those inside functions, are resolved in a subprocess with the
benchmarks folder first on the path, then the script body runs under a name other than "__main__".
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def imports_of(script: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every absolute import in the script, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            found.append((node.module, [alias.name for alias in node.names]))
    return found


CHECK = """
import importlib, runpy, sys
sys.path.insert(0, {folder!r})
for module, names in {imports!r}:
    m = importlib.import_module(module)
    for name in names:  # `from m import name`: an attribute, else a submodule
        if not hasattr(m, name):
            importlib.import_module(module + "." + name)
        getattr(m, name)
runpy.run_path({script!r}, run_name="benchmark_import_check")
"""


def test_every_script_is_checked():
    assert {s.name for s in SCRIPTS} >= {"kernel_speed.py", "generate_overhead.py", "profile_step.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_name_shadows_nothing(script):
    name = script.stem
    assert name not in sys.stdlib_module_names, f"benchmarks/{script.name} shadows the standard library"
    distributions = importlib.metadata.packages_distributions()
    assert name not in distributions, f"benchmarks/{script.name} shadows {distributions.get(name)}"
    assert importlib.util.find_spec(name) is None, f"benchmarks/{script.name} shadows an installed module"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_as_a_run_would(script):
    code = CHECK.format(folder=str(BENCHMARKS), imports=imports_of(script), script=str(script))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_kernel_speed_dry_run(tmp_path):
    """The kernel benchmark's CPU dry run: every path that can run is timed and checked for error."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(BENCHMARKS / "kernel_speed.py"), "--dry-run", "--shapes", "qwen.k/v",
           "--qtypes", "Q8_0", "FP8_E4M3", "--m", "1", "64", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["qtype"], r["M"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("Q8_0", 1), ("Q8_0", 64), ("FP8_E4M3", 1), ("FP8_E4M3", 64)}
    for (qtype, m), r in rows.items():
        assert ("gemv_s" in r) == (m <= 16)
        assert r["dequant_rel_err"] < 1e-5 and r.get("gemv_rel_err", 0) < 1e-5  # float32 on the CPU
        assert ("fp8_native_rel_err" in r) == (qtype == "FP8_E4M3")
        assert r["fastest_path"] in ("dequant", "gemv")
