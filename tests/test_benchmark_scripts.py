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
