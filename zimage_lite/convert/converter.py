"""`convert(src, out, quant)`: a model folder, a component folder or one file -> GGUF / FP8 / BF16 outputs.

- a diffusers folder (or a converted one, with a manifest) -> an output folder: `transformer.gguf`
  (`transformer.safetensors` for fp8), `text_encoder.gguf` (qwen3 + tokenizer), `vae/` (BF16, with its
  config.json), a copy of `tokenizer/` and `scheduler/`, and the manifest `zimage-lite.json`;
- a component folder or a single .safetensors/.gguf file -> one output file of the same component.
Everything is written under a temporary name and renamed when complete (see atomic.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from zimage_lite.convert.atomic import atomic_path, refuse_existing
from zimage_lite.convert.plan import (
    ComponentPlan,
    plan_controlnet,
    plan_text_encoder,
    plan_transformer,
    plan_vae,
    text_encoder_tokenizer_fields,
)
from zimage_lite.convert.quantizers import check_device, quantizer_metadata
from zimage_lite.convert.recipe import RecipeOptions, apply
from zimage_lite.convert.stream import DENSE, run_jobs
from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.preflight import check_disk, convert_output_bytes
from zimage_lite.weights.checkpoint import describe, open_checkpoint
from zimage_lite.weights.components import MANIFEST, resolve_model

log = logging.getLogger(__name__)

QUANTS = ("bf16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "fp8")
MANIFEST_FORMAT = 1


@dataclass
class ConvertResult:
    out: Path
    quant: str
    components: dict[str, Path] = field(default_factory=dict)  # component -> written path
    tensors: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0
    types: dict[str, int] = field(default_factory=dict)  # storage type -> tensor count

    @property
    def gb_per_s(self) -> float:
        return self.in_bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def known_quants() -> list[str]:
    from zimage_lite.quant.policy import PRESETS

    return list(dict.fromkeys([*QUANTS, *PRESETS]))


def _check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in known_quants():
        raise UsageError(f"unknown quantization {quant!r} (choose one of {', '.join(known_quants())})")
    return q


def write_plan(
    plan: ComponentPlan,
    path: Path,
    threads: int | None,
    progress: bool,
    device: str | None = None,
    quantizer: str | None = None,
) -> int:
    """Write one component file at `path` (already a temporary name); returns bytes written."""
    metadata = {**plan.metadata, **quantizer_metadata(plan, device, quantizer)}
    if plan.container == "gguf":
        from zimage_lite.weights.gguf_writer import GGUFStreamWriter

        writer = GGUFStreamWriter(path, plan.architecture, metadata)
        for o in plan.outputs:
            writer.add(o.name, o.shape, o.storage)
    else:
        import torch

        from zimage_lite.weights.safetensors_writer import SafetensorsStreamWriter

        dtypes = {**DENSE, "FP8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8}
        writer = SafetensorsStreamWriter(path, {k: str(v) for k, v in metadata.items()})
        for o in plan.outputs:
            writer.add(o.name, o.shape, dtypes[o.storage])
    try:
        writer.begin()
        run_jobs(plan.jobs, writer.write, threads, progress, plan.component, device, quantizer)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return path.stat().st_size


def _plan_for(component: str, source, src: Path, quant: str, tokenizer_dir: Path | None) -> ComponentPlan:
    if component == "transformer":
        return plan_transformer(source, src, quant)
    if component == "controlnet":
        return plan_controlnet(source, src, quant)
    if component == "text_encoder":
        fields = text_encoder_tokenizer_fields(source, src, tokenizer_dir)
        return plan_text_encoder(source, src, quant, fields)
    return plan_vae(source, src)


def _suffix(plan: ComponentPlan) -> str:
    return ".gguf" if plan.container == "gguf" else ".safetensors"


def _account(result: ConvertResult, plan: ComponentPlan, out_bytes: int) -> None:
    result.tensors += len(plan.outputs)
    result.in_bytes += sum(j.in_bytes for j in plan.jobs)
    result.out_bytes += out_bytes
    for o in plan.outputs:
        result.types[o.storage] = result.types.get(o.storage, 0) + 1


def _base(quant: str, options: RecipeOptions) -> str:
    """The preset plans start from: a target size retypes from BF16 (what it keeps, stays so)."""
    if options.target_size is not None and quant.startswith("target-"):
        return "bf16"
    if options.any() and quant == "fp8":
        raise UsageError("--imatrix, --tensor-type-rules and --target-size make GGUF files, not fp8")
    return quant


def _sibling_tokenizer(src: Path) -> Path | None:
    folder = src if src.is_dir() else src.parent
    for candidate in (folder / "tokenizer", folder.parent / "tokenizer", folder):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def _given_tokenizer(tokenizer: Path, component: str) -> Path:
    """--tokenizer's folder, checked: a folder with tokenizer.json (or that file), for a text encoder."""
    tokenizer = Path(tokenizer).expanduser()
    if component != "text_encoder":
        raise UsageError(f"--tokenizer is for a text encoder; this input is a {component.replace('_', ' ')}")
    if tokenizer.is_file() and tokenizer.name == "tokenizer.json":
        return tokenizer.parent
    if not tokenizer.exists():
        raise CheckpointError(f"{tokenizer}: no such tokenizer folder (--tokenizer)")
    if not (tokenizer / "tokenizer.json").is_file():
        raise CheckpointError(f"{tokenizer}: no tokenizer.json in this folder (--tokenizer)")
    return tokenizer


def _convert_one(
    src: Path,
    out: Path,
    quant: str,
    force: bool,
    progress: bool,
    threads: int | None,
    tokenizer: Path | None,
    device: str | None,
    quantizer: str | None,
    options: RecipeOptions,
) -> ConvertResult:
    source = open_checkpoint(src)
    detected = describe(source, src)
    if tokenizer is not None:
        tokenizer = _given_tokenizer(tokenizer, detected.component)
    plan = _plan_for(
        detected.component, source, src, _base(quant, options), tokenizer or _sibling_tokenizer(src)
    )
    apply([plan], options, device, quantizer, threads)
    quantizer_metadata(plan, device, quantizer)  # a forced quantizer that cannot run fails here
    if out.is_dir():  # an existing folder: put the file in it, named after the input
        out = out / f"{src.stem if src.is_file() else src.name}-{quant}{_suffix(plan)}"
    elif not out.suffix:
        out = out.with_suffix(_suffix(plan))
    elif out.suffix.lower() != _suffix(plan):
        raise UsageError(
            f"{out}: a {detected.component.replace('_', ' ')} converted to {quant} is a {_suffix(plan)} file"
        )
    result = ConvertResult(out, quant)
    check_disk(out, convert_output_bytes([plan]))
    with atomic_path(out, force) as tmp:
        _account(result, plan, write_plan(plan, tmp, threads, progress, device, quantizer))
    result.components[detected.component] = out
    return result


def _convert_model(
    src: Path,
    out: Path,
    quant: str,
    force: bool,
    progress: bool,
    threads: int | None,
    device: str | None,
    quantizer: str | None,
    options: RecipeOptions,
) -> ConvertResult:
    from zimage_lite.variants import read_variant

    paths = resolve_model(src)
    variant = read_variant(src).name  # carried into the manifest: the defaults a run of it gets
    result = ConvertResult(out, quant)
    # plan (and so validate) every component before writing anything
    plans: dict[str, ComponentPlan] = {}
    for component in ("transformer", "text_encoder", "vae"):
        path = getattr(paths, component)
        source = open_checkpoint(path)
        found = describe(source, path).component
        if found != component:
            raise CheckpointError(
                f"{path}: expected a {component.replace('_', ' ')}, found a {found.replace('_', ' ')}"
            )
        tok_dir = paths.tokenizer if paths.tokenizer.is_dir() else None
        plans[component] = _plan_for(component, source, path, _base(quant, options), tok_dir)
    recorded = apply(list(plans.values()), options, device, quantizer, threads)
    for plan in plans.values():
        quantizer_metadata(plan, device, quantizer)  # a forced quantizer that cannot run
    check_disk(out, convert_output_bytes(plans.values(), [paths.tokenizer, src / "scheduler"]))
    with atomic_path(out, force, folder=True, marks=(MANIFEST,)) as tmp:
        manifest: dict[str, str] = {}
        for component, plan in plans.items():
            if component == "vae":
                (tmp / "vae").mkdir()
                name = "vae/diffusion_pytorch_model.safetensors"
                if plan.config_json is not None:
                    (tmp / "vae" / "config.json").write_text(json.dumps(plan.config_json, indent=2))
                manifest["vae"] = "vae" if plan.config_json is not None else name
            else:
                name = component + _suffix(plan)
                manifest[component] = name
            _account(result, plan, write_plan(plan, tmp / name, threads, progress, device, quantizer))
        for extra in ("tokenizer", "scheduler"):
            folder = paths.tokenizer if extra == "tokenizer" else src / "scheduler"
            if folder.is_dir():
                shutil.copytree(folder, tmp / extra)
                if extra == "tokenizer":
                    manifest["tokenizer"] = "tokenizer"
        (tmp / MANIFEST).write_text(
            json.dumps(
                {
                    "format": MANIFEST_FORMAT,
                    "quant": quant,
                    "variant": variant,
                    "components": manifest,
                    **recorded,
                },
                indent=2,
            )
        )
    result.components = {k: out / v for k, v in manifest.items()}
    return result


def convert(
    src: Path,
    out: Path,
    quant: str | None,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
    tokenizer: Path | None = None,
    device: str | None = None,
    quantizer: str | None = None,
    options: RecipeOptions | None = None,
) -> ConvertResult:
    """Convert a model folder, a component folder or a single file; see the module docstring.

    `threads`: encoder threads (default: all cores). `tokenizer`: a tokenizer folder to embed in a text
    encoder GGUF when converting a lone text encoder (default: a `tokenizer/` folder next to it).
    `device`: quantize there (e.g. "cuda": Q8_0, Q4_0, FP8 and BF16 only); default the CPU.
    `quantizer`: "ggml" or "torch" forces one (formats.quantize); default ggml's on the CPU where its
    library is installed. GGUF and FP8 files record it under `zimage_lite.quantizer`.
    `options`: an imatrix, tensor-type rules, a target size (recipe.py; with a target size `quant` may be
    None and the manifest calls it "target-<bytes>")."""
    from zimage_lite.weights.checkpoint import is_model_folder

    start = time.perf_counter()
    options = options or RecipeOptions()
    if (quant is None) == (options.target_size is None):
        raise UsageError("give either --quant or --target-size (a target size chooses the types itself)")
    if quant is None:
        quant = f"target-{options.target_size}"
    else:
        quant = _check_quant(quant)
        check_device(quant, device)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UsageError(f"{out}: the output must not be the input or inside it")
    if is_model_folder(src):
        if tokenizer is not None:
            raise UsageError(
                "--tokenizer is for a lone text encoder: a model folder's own tokenizer/ is used"
            )
        refuse_existing(out, force, (MANIFEST,))
        result = _convert_model(src, out, quant, force, progress, threads, device, quantizer, options)
    else:
        result = _convert_one(
            src, out, quant, force, progress, threads, tokenizer, device, quantizer, options
        )
    result.seconds = time.perf_counter() - start
    log.info(
        "converted %s -> %s (%s): %d tensors, %.2f GB -> %.2f GB in %.1f s",
        src,
        result.out,
        quant,
        result.tensors,
        result.in_bytes / 1e9,
        result.out_bytes / 1e9,
        result.seconds,
    )
    return result


def type_counts(result: ConvertResult) -> Counter:
    return Counter(result.types)
