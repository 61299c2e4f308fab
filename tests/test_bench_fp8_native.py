"""The opt-in `fp8-native` bench row: the fp8 files, with FP8 matmuls on torch._scaled_mm (CPU here)."""

from __future__ import annotations

import argparse
import json

from zimage_lite.bench import sources
from zimage_lite.bench.runner import add_bench_arguments, config_from_args, run_bench_from_args


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_fp8_native_is_asked_for_by_name_only():
    assert "fp8" in sources.available_precisions()
    assert "fp8-native" not in sources.available_precisions()
    cfg = config_from_args(_args("--synthetic", "tiny", "--precisions", "fp8-native"))
    assert cfg.precisions == ["bf16", "fp8-native"]
    assert sources.base_precision("fp8-native") == ("fp8", {"fp8_matmul": "native"})
    assert sources.base_precision("q8_0") == ("q8_0", {})


def test_fp8_native_row_beside_fp8(tmp_path):
    assert "fp8" in sources.available_precisions()
    out = tmp_path / "out"
    args = _args(
        "--synthetic", "tiny", "--precisions", "bf16,fp8,fp8-native", "--prompts", "1", "--seeds", "0",
        "--steps", "2", "--width", "64", "--height", "64", "--repeats", "1", "--warmup", "0",
        "--device", "cpu", "--out", str(out), "--cache", str(tmp_path / "cache"), "-q",
    )  # fmt: skip
    assert run_bench_from_args(args) == 0
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    fp8, native = rows["fp8"], rows["fp8-native"]
    assert native["status"] == "ok", native.get("reason")
    assert native["source"] == fp8["source"]  # the same converted files
    # activations quantized to e4m3 on top of the fp8 weights: a different, larger loss
    e_fp8 = fp8["quality"]["latent_rel_error_mean"]
    e_native = native["quality"]["latent_rel_error_mean"]
    assert 0 < e_fp8 < e_native < 1
