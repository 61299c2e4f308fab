#!/usr/bin/env bash
# One short GPU session for the kernel work (issue #12), about 6-10 minutes on an H100/H200 including
# writing the full-size synthetic model once. Run from the repository root; results land in
# benchmarks/results/ (kernel-speed-<gpu>.json, profile-step-<gpu>-<precision>.json/.md).
#   1. the GPU-marked kernel tests (bf16 paths, native FP8 decode, torch._scaled_mm, flash SDPA);
#   2. kernel speeds: every matmul path vs bf16 cuBLAS, at the M of the text encoder and the DiT;
#   3. one denoising step profiled, resident and streamed at 6 GB.
# PRECISION=bf16 skips the conversion; SIZE=small is a quick smoke run of step 3.
set -euo pipefail
PYTHON=${PYTHON:-python}
PRECISION=${PRECISION:-q8_0}
SIZE=${SIZE:-full}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_dequant.py tests/test_kernels_gemv.py \
    tests/test_kernels_fp8_matmul.py tests/test_dit_attention_mask.py || echo "GPU tests failed (continuing)"
"$PYTHON" benchmarks/kernel_speed.py --shapes dit.qkv dit.w2 qwen.q qwen.down --m 1 4 16 64 4096 --repeats 10
"$PYTHON" benchmarks/profile_step.py --size "$SIZE" --precision "$PRECISION" --modes resident streamed --vram 6GB
