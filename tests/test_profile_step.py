"""benchmarks/profile_step.py: the kernel grouping on real kernel names, and a CPU dry run end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "profile_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("profile_step_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNELS = {  # names as CUDA profiles and CPU profiles show them
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
    "_gemv_kernel": "matmul",
    "aten::addmm": "matmul",
    "_dequant_blocks_kernel": "dequant",
    "_dequant_fp8_kernel": "dequant",
    "Memcpy HtoD (Pinned -> Device)": "copies",
    "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(...)>": "copies",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>": "norms+RoPE",
    "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda(...)>": "norms+RoPE",
    "aten::view_as_complex": "norms+RoPE",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
}


@pytest.mark.parametrize(("name", "group"), KERNELS.items(), ids=list(KERNELS.values()))
def test_kernel_groups(name, group):
    assert load_script().category(name) == group


def test_summary_adds_up():
    script = load_script()
    step = {name: 0.001 * (i + 1) for i, name in enumerate(KERNELS)}
    summary = script.summarize(step, wall_s=0.5)
    assert summary["kernel_s"] == pytest.approx(sum(step.values()))
    assert summary["groups_s"]["copies"] == pytest.approx(0.010 + 0.011)
    assert summary["top_kernels"][0]["s"] == max(step.values())
    assert len(summary["attention_kernels"]) == 3


def test_cpu_dry_run(tmp_path):
    out = tmp_path / "profile"
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--modes", "resident", "streamed",
           "--vram", "64MB", "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    for mode in ("resident", "streamed"):
        r = report["modes"][mode]
        assert r["step_wall_s"] > 0
        assert r["groups_s"]["matmul"] > 0 and r["groups_s"]["attention"] > 0
        assert sum(r["groups_s"].values()) == pytest.approx(r["kernel_s"])
        assert r["attention_kernels"]
    assert "| matmul |" in out.with_suffix(".md").read_text()
