"""`convert --imatrix FILE`: hand each quantized tensor its importance vector, and record it as llama.cpp does.

Every type ggml quantizes with an importance matrix gets one (Q2_K..Q6_K, Q4_0; Q8_0 and the float types
ignore it, as in ggml) when the file has an entry of that tensor's name; the file records
`quantize.imatrix.file`, `.dataset`, `.entries_count` and `.chunks_count` (llama-quantize's keys). Only
ggml's own quantizers take an imatrix: `--quantizer torch` or a GPU is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from zimage_lite.convert.plan import ComponentPlan
from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.quant.imatrix import Imatrix

log = logging.getLogger(__name__)

IMATRIX_KEYS = {
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries": "quantize.imatrix.entries_count",
    "chunks": "quantize.imatrix.chunks_count",
}
# ggml ignores an importance matrix for these block types (quantize_q8_0 is its reference quantizer).
IGNORES_IMATRIX = ("Q8_0",)


def check_quantizer(device: str | None, quantizer: str | None) -> None:
    """One line where the chosen quantizer cannot use an imatrix."""
    import torch

    if quantizer == "torch":
        raise UsageError(
            "--imatrix needs ggml's quantizers; the torch quantizer (--quantizer torch) has none"
        )
    if device is not None and torch.device(device).type != "cpu":
        raise UsageError(
            f"--imatrix needs ggml's quantizers, which run on the CPU: leave out --device {device}"
        )
    from zimage_lite.quant import ggml_lib

    if not ggml_lib.available():
        raise UsageError(f"--imatrix needs ggml's quantizers: {ggml_lib.unavailable_reason()}")


def load(path: Path | str, device: str | None, quantizer: str | None) -> Imatrix:
    from zimage_lite.weights.imatrix_io import read_imatrix

    check_quantizer(device, quantizer)
    return read_imatrix(path)


def uses_imatrix(storage: str) -> bool:
    from zimage_lite.quant.formats import QUANT_TYPES

    return storage in QUANT_TYPES and storage not in IGNORES_IMATRIX


def attach(plan: ComponentPlan, imatrix: Imatrix, path: Path | str) -> int:
    """Set each job's imatrix vector; add the record to a GGUF plan's metadata. Returns the tensors that
    got one. A vector of the wrong length is an error (another model's imatrix); a missing one a warning."""
    used, missing = 0, []
    for job in plan.jobs:
        if not uses_imatrix(job.qtype):
            continue
        values = imatrix.values(job.name)
        if values is None:
            missing.append(job.name)
            continue
        if values.numel() != job.shape[-1]:
            raise CheckpointError(
                f"{path}: imatrix entry {job.name} has {values.numel()} values, the tensor's rows {job.shape[-1]}"
                " (an imatrix of another model?)"
            )
        job.imatrix = values
        used += 1
    if missing:  # the token table and the text encoder's unused last layer never have one
        say = log.warning if not used else log.info
        say("%s: no imatrix entry for %d of %d tensors (%s): quantized without", plan.component, len(missing),
            len(missing) + used, ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))  # fmt: skip
    if used and plan.container == "gguf":
        plan.metadata.update(record(imatrix, path))
    return used


def summary(imatrix: Imatrix, path: Path | str) -> dict[str, Any]:
    """file, dataset, entries, chunks: what a converted file records (the manifest keeps these names)."""
    dataset = imatrix.datasets[0] if imatrix.datasets else ""
    return {"file": str(path), "dataset": dataset, "entries": len(imatrix.entries), "chunks": imatrix.chunks}


def record(imatrix: Imatrix, path: Path | str) -> dict[str, Any]:
    """The GGUF metadata llama-quantize writes (its keys; counts as int32)."""
    s = summary(imatrix, path)
    return {IMATRIX_KEYS[k]: ("i32", v) if isinstance(v, int) else v for k, v in s.items()}
