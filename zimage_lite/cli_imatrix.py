"""`zimage-lite imatrix`: gather an importance matrix by running generations (quant/imatrix.py), write it
as llama.cpp's GGUF or stable-diffusion.cpp's .dat (weights/imatrix_io.py). Part of the command line:
it prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zimage_lite import cli_args
from zimage_lite.errors import UsageError


def add_imatrix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers-layout folder or converted folder (any precision)")
    p.add_argument("--transformer", help="transformer file or folder (overrides the model's)")
    p.add_argument("--text-encoder", help="text encoder file or folder (overrides the model's)")
    p.add_argument("--vae", help="VAE file or folder (overrides the model's)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder")
    p.add_argument("-o", "--output", type=cli_args.output_file, required=True,
                   help="imatrix file: .gguf (llama.cpp's format) or .dat (stable-diffusion.cpp's)")  # fmt: skip
    p.add_argument("--prompts", help="text file, one prompt per line (default: a built-in varied set of 16)")
    p.add_argument("--steps", type=cli_args.steps, default=8)
    p.add_argument("--seed", type=cli_args.seed, default=0, help="first seed (one more per prompt)")
    p.add_argument("--width", type=cli_args.image_size, default=1024)
    p.add_argument("--height", type=cli_args.image_size, default=1024)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--vram", default=None, help="VRAM budget (4GB, 6GB, auto): weights stream to fit it")
    p.add_argument("--card", default=None, help="run as on a card of this size (see generate --card)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--in", dest="merge", action="append", metavar="FILE",
                   help="add this imatrix's sums to the new ones (continue gathering, as sd.cpp's --imat-in); "
                   "repeatable")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def read_prompts(path: str | None) -> tuple[list[str], str]:
    """(prompts, dataset name for the file's record)."""
    from zimage_lite.quant.imatrix import CALIBRATION_PROMPTS

    if path is None:
        return list(
            CALIBRATION_PROMPTS
        ), f"zimage-lite built-in calibration prompts ({len(CALIBRATION_PROMPTS)})"
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such prompts file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{file}: no prompts in it (one per line)")
    return prompts, file.name


def cmd_imatrix(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_lite import preflight
    from zimage_lite.pipeline import Pipeline, check_size
    from zimage_lite.quant.imatrix import collect
    from zimage_lite.text import MAX_PROMPT_TOKENS
    from zimage_lite.weights.imatrix_io import check_suffix, read_imatrix, write_imatrix

    out = Path(args.output)
    check_suffix(out)
    earlier = [read_imatrix(f) for f in args.merge or []]  # read first: a bad file fails before the work
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    check_size(args.width, args.height)
    prompts, dataset = read_prompts(args.prompts)
    preflight.before_load(
        args.model, args.transformer, args.text_encoder, args.vae, args.tokenizer, args.device, args.dtype
    )
    pipe = Pipeline.load(
        args.model, transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae,
        tokenizer=args.tokenizer, device=args.device, vram=args.vram, dtype=args.dtype, card=args.card,
    )  # fmt: skip
    for source in (pipe.paths.transformer, pipe.paths.text_encoder):
        if Path(source).resolve() == out.resolve():
            raise UsageError(f"{out}: the output must not be an input")
    size = (args.width, args.height, 1, MAX_PROMPT_TOKENS)
    preflight.check_generation(pipe, *size)
    with tqdm(total=len(prompts), desc="imatrix", unit="prompt", file=sys.stderr, disable=args.quiet) as bar:
        with preflight.device_oom_as_error(pipe, *size):
            imatrix = collect(
                pipe, prompts, steps=args.steps, width=args.width, height=args.height, seed=args.seed,
                dataset=dataset, on_prompt=lambda i: bar.update(1),
            )  # fmt: skip
    for other in earlier:
        imatrix.merge(other)
    write_imatrix(imatrix, out, force=args.force)
    tokens = sum(e.count for e in imatrix.entries.values())
    print(f"wrote {out} ({len(imatrix.entries)} entries, {imatrix.chunks} prompts, {tokens} rows in all)")
    return 0


def add_recipe_arguments(c: argparse.ArgumentParser) -> None:
    """convert's calibration options (convert/calibrated.py, convert/recipe.py)."""
    c.add_argument("--imatrix", help="importance matrix (.gguf from zimage-lite imatrix or llama.cpp, .dat from "
                   "stable-diffusion.cpp): ggml's quantizers weigh each input channel by it")  # fmt: skip
    c.add_argument("--tensor-type-rules", metavar="REGEX=TYPE,...",
                   help="per-tensor types, stable-diffusion.cpp's syntax (e.g. 'attention.qkv=q8_0,w2=q6_k')")  # fmt: skip
    c.add_argument("--target-size", metavar="SIZE",
                   help="instead of --quant: choose each tensor's type by measured sensitivity so the GGUF "
                   "files fit SIZE (5GB, 4.5GiB, as --vram takes it)")  # fmt: skip


def parse_target_size(text: str) -> int:
    """A --target-size in bytes ("5GB", "4.5GiB", as --vram takes it)."""
    from zimage_lite.runtime.budget import parse_vram

    try:
        target = parse_vram(text)
    except UsageError:
        raise UsageError(f"invalid --target-size {text!r}: use a size like 5GB or 4.5GiB") from None
    if target is None:
        raise UsageError("--target-size needs a size, not auto")
    return target


def recipe_options(args: argparse.Namespace):
    from zimage_lite.convert.recipe import RecipeOptions

    target = None if args.target_size is None else parse_target_size(args.target_size)
    imatrix = Path(args.imatrix) if args.imatrix else None
    return RecipeOptions(imatrix, args.tensor_type_rules, target)
