"""Which quantizer writes a conversion, and where: the device check and the file's record of it.

On the CPU ggml's own quantizers write every GGUF type (formats.pick_quantizer); a GPU writes only what
our torch quantizers do exactly and fast there. Each file records what wrote it (QUANTIZER_KEY), for
`inspect` and the bench report.
"""

from __future__ import annotations

from zimage_lite.convert.plan import ComponentPlan
from zimage_lite.errors import UsageError

# Presets whose bulk a GPU quantizes exactly and fast (the torch Q8_0 / Q4_0 quantizers give ggml's
# bytes anywhere; FP8 and BF16 are casts). The K-quant presets are ggml's job, on the CPU.
DEVICE_PRESET_TYPES = ("Q8_0", "Q4_0", "FP8_E4M3", "BF16")


def check_device(quant: str, device: str | None) -> None:
    """Refuse K-quant presets off the CPU: there our torch emulation is slow and its bytes are not always
    ggml's. (The few K-quant tensors of other presets, e.g. q4_0's Q6_K token table, stay on the CPU.)"""
    import torch

    from zimage_lite.quant.policy import PRESETS

    if device is None or torch.device(device).type == "cpu" or PRESETS[quant]["base"] in DEVICE_PRESET_TYPES:
        return
    raise UsageError(
        f"--device {device} quantizes q8_0, q4_0, fp8 and bf16 only, not {quant}: convert it on the CPU "
        "(leave out --device), where ggml's own quantizers write the K-quants"
    )


def quantizer_metadata(plan: ComponentPlan, device: str | None, quantizer: str | None) -> dict[str, str]:
    """{QUANTIZER_KEY: what writes this file's quantized tensors}, or {} when it has none; "<one> for
    Q4_0; <other> for Q6_K" when two do. Raises UsageError where a forced quantizer cannot run."""
    from zimage_lite.quant.formats import (
        QUANT_TYPES,
        QUANTIZER_KEY,
        pick_quantizer,
        quantize_on,
        quantizer_version,
    )

    storages = {o.storage for o in plan.outputs}
    writers: dict[str, list[str]] = {}
    for qtype in sorted(storages & set(QUANT_TYPES)):
        picked = pick_quantizer(quantize_on(qtype, device), quantizer)
        if picked == "torch" and QUANT_TYPES[qtype].quantize is None:
            raise UsageError(
                f"{qtype} is written by ggml's quantizers only (on the CPU, without --quantizer torch)"
            )
        version = quantizer_version(picked)
        writers.setdefault(version, []).append(qtype)
    if len(writers) == 1:
        return {QUANTIZER_KEY: next(iter(writers))}
    if writers:
        return {QUANTIZER_KEY: "; ".join(f"{v} for {', '.join(types)}" for v, types in writers.items())}
    if "FP8_E4M3" in storages:
        import torch

        return {QUANTIZER_KEY: f"torch {torch.__version__} (float8_e4m3fn cast)"}
    return {}
