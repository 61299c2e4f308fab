"""`zimage-lite` command line: generate | convert | inspect | bench | synthetic | imatrix | serve.

Only this module prints. Every failure ends with one line on stderr (cli_errors.py: exit code 2 for what a
user or the machine caused, 130 for Ctrl-C, 1 for a bug; `-v` adds the traceback). Arguments are checked
where they are parsed (cli_args.py), resources before the work (preflight.py); outputs are written under a
temporary name and renamed when complete, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

from zimage_lite import cli_args, cli_control
from zimage_lite.cli_errors import EXIT_USAGE, Terminated, describe, one_line, sigterm_raises
from zimage_lite.convert.atomic import committed
from zimage_lite.errors import UsageError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat` whose reader left


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a token that starts with a minus and a digit is a value (`--vram -1GB`), never an option: so
        # the value's own check says what is wrong, not "expected one argument"
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str):  # one line, not usage + message
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def atomic_write(path: Path, write, force: bool = True) -> None:
    """Call write(tmp_path) and rename the result onto `path` only when it completed (the umask's mode)."""
    from zimage_lite.convert.atomic import atomic_path

    with atomic_path(path, force) as tmp:
        write(tmp)


def output_paths(out: Path, count: int) -> list[Path]:
    """A batch's files: out.png for one image, else out-0.png, out-1.png, ... (README, "Batches")."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _check_generate_outputs(args: argparse.Namespace) -> list[Path]:
    """The image files to write, checked before any work: a known image type, not an input, not named
    twice, not existing without --force (outputs.check_outputs)."""
    from zimage_lite.outputs import check_outputs, image_format

    out = Path(args.output)
    image_format(out)
    if args.batch_index is not None and args.batch_index >= args.batch:
        raise UsageError(
            f"--batch-index {args.batch_index} is not in a batch of {args.batch} (0 to {args.batch - 1})"
        )
    outs = output_paths(out, 1 if args.batch_index is not None else args.batch)
    named = {"-o" if len(outs) == 1 else f"-o (image {i})": p for i, p in enumerate(outs)}
    if args.stats:
        named["--stats"] = Path(args.stats)
    sources = {"--init-image": args.init_image, "--mask": args.mask, "--model": args.model,
               "--transformer": args.transformer, "--text-encoder": args.text_encoder, "--vae": args.vae,
               "--tokenizer": args.tokenizer}  # fmt: skip
    sources.update({f"--lora {spec}": parse_lora(spec)[0] for spec in args.lora or []})
    inputs = {k: Path(v).expanduser() for k, v in sources.items() if v is not None}
    check_outputs(named, inputs, args.force)
    return outs


def parse_lora(spec: str) -> tuple[str, float]:
    """`style.safetensors[:0.8]` -> (path, scale). A suffix that is not a number belongs to the path
    (`C:lora`), unless the part before it is a file: then the scale is what is wrong."""
    path, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        scale = float(tail)
    except ValueError:
        if Path(path).expanduser().is_file():
            raise UsageError(f"--lora {spec}: the scale {tail!r} is not a number (FILE:0.8)") from None
        return spec, 1.0
    if not math.isfinite(scale):
        raise UsageError(f"--lora {spec}: the scale must be a finite number (got {tail})")
    return path, scale


def _image_inputs(args: argparse.Namespace) -> dict:
    """generate() keyword arguments for --init-image / --mask / --strength; fills in --width/--height
    from the init image (rounded down to multiples of 16) when they were not given."""
    from zimage_lite.init_image import open_image

    if args.init_image is None:
        if args.mask is not None or args.strength is not None:
            raise UsageError("--mask and --strength need --init-image")
        args.width, args.height = args.width or 1024, args.height or 1024
        return {}
    image = open_image(args.init_image, "init image")
    if min(image.size) < 16 and (args.width is None or args.height is None):
        raise UsageError(
            f"{args.init_image}: the init image is {image.width}x{image.height}, below the 16-pixel minimum "
            "side of an output: give --width and --height"
        )
    args.width = args.width or max(16, image.width // 16 * 16)
    args.height = args.height or max(16, image.height // 16 * 16)
    inputs = {"image": image, "strength": args.strength}
    if args.mask is not None:
        inputs["mask"] = open_image(args.mask, "mask")
    return inputs


def _pass_meta(args: argparse.Namespace, pipe) -> dict[str, str]:
    """PNG text for the inputs beyond the prompt: init image, mask, strength, LoRAs, the hires pass."""
    from zimage_lite.pipeline import effective_strength

    meta = {}
    if args.init_image is not None:
        meta["init_image"] = str(args.init_image)
        meta["strength"] = f"{effective_strength(args.strength, args.mask):g}"
    if args.mask is not None:
        meta["mask"] = str(args.mask)
    if pipe.loras:
        meta["loras"] = "; ".join(f"{path}:{scale:g}" for path, _, scale in pipe.loras)
    if args.hires is not None:
        meta["hires"] = f"{args.hires:g}x, strength {args.hires_strength:g}, same seed and steps"
    return meta


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_lite import preflight
    from zimage_lite.cli_guidance import guidance_kwargs, guidance_meta
    from zimage_lite.init_image import upscaled_size
    from zimage_lite.outputs import save_image
    from zimage_lite.pipeline import Pipeline, check_size
    from zimage_lite.text import MAX_PROMPT_TOKENS

    outs = _check_generate_outputs(args)
    inputs = _image_inputs(args)
    check_size(args.width, args.height)
    inputs.update(cli_control.control_inputs(args))
    start = time.perf_counter()
    preflight.before_load(
        args.model, args.transformer, args.text_encoder, args.vae, args.tokenizer, args.device, args.dtype
    )
    pipe = Pipeline.load(
        args.model, transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae,
        tokenizer=args.tokenizer, device=args.device, vram=args.vram, dtype=args.dtype, card=args.card,
        fp8_matmul=args.fp8_matmul, variant=args.variant, controlnet=args.controlnet,
    )  # fmt: skip
    for spec in args.lora or []:
        pipe.load_lora(*parse_lora(spec))
    big = (
        (args.width, args.height)
        if args.hires is None
        else upscaled_size(args.width, args.height, args.hires)
    )
    _, cfg = pipe.sampling_settings(args.steps, args.guidance, args.cfg_normalization, args.cfg_truncation)
    # upper bounds: the larger pass, the longest caption, a negative pass beside each image under guidance
    size = (*big, args.batch * (2 if cfg.active else 1), MAX_PROMPT_TOKENS)
    preflight.check_generation(pipe, *size)
    bar = None

    def on_step(i: int, n: int) -> None:
        nonlocal bar
        if bar is None or i == 0 and bar.n:  # a new bar per pass; an early refusal prints only its error
            if bar is not None:
                bar.close()
            bar = tqdm(total=n, desc="denoise", unit="step", file=sys.stderr, disable=args.quiet)
        bar.update(1)

    hires_stats = []
    try:
        with preflight.device_oom_as_error(pipe, *size):
            images = pipe.generate(
                args.prompt, seed=args.seed, steps=args.steps, width=args.width, height=args.height,
                batch=args.batch, batch_index=args.batch_index, on_step=on_step, **inputs, **guidance_kwargs(args),
            )  # fmt: skip
            first_stats = pipe.last_stats
            if args.hires is not None:
                hires = []
                for img in images:
                    hires += pipe.hires_fix(img, args.prompt, scale=args.hires, strength=args.hires_strength,
                                            seed=args.seed, steps=args.steps, on_step=on_step,
                                            **guidance_kwargs(args), **cli_control.hires_inputs(inputs))  # fmt: skip
                    hires_stats.append(pipe.last_stats.to_dict())
                images = hires
    finally:
        if bar is not None:
            bar.close()
    meta = {
        "prompt": args.prompt, "seed": str(args.seed), "steps": str(args.steps),
        "size": "x".join(map(str, images[0].size)), "dtype": str(pipe.dtype).removeprefix("torch."),
        "software": "zimage-lite", **{f"model.{k}": v for k, v in pipe.paths.describe().items()},
    }  # fmt: skip
    if args.hires is not None:
        meta["first_pass_size"] = f"{args.width}x{args.height}"
    meta.update(guidance_meta(pipe, args))
    meta.update(_pass_meta(args, pipe))
    meta.update(cli_control.control_meta(args))
    for i, (img, path) in enumerate(zip(images, outs)):
        index = i if args.batch_index is None else args.batch_index
        image_meta = {**meta, "batch": str(args.batch), "batch_index": str(index)}
        atomic_write(path, lambda tmp, img=img, m=image_meta, p=path: save_image(img, tmp, m, p), args.force)
        print(f"wrote {path}")
    if args.stats:
        stats = {
            **first_stats.to_dict(), "load_s": pipe.load_seconds, "total_s": time.perf_counter() - start,
            "device": str(pipe.device), "dtype": meta["dtype"], "width": args.width, "height": args.height,
            "steps": int(meta["steps"]), "batch": args.batch, "variant": meta["variant"],
            "guidance": float(meta["guidance"]),
        }  # fmt: skip
        if hires_stats:
            stats["hires_passes"] = hires_stats
        atomic_write(Path(args.stats), lambda tmp: tmp.write_text(json.dumps(stats, indent=2)), args.force)
        print(f"wrote {args.stats}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from zimage_lite.cli_imatrix import recipe_options
    from zimage_lite.convert.converter import convert

    result = convert(
        Path(args.src), Path(args.output), args.quant, force=args.force, progress=not args.quiet,
        threads=args.threads, tokenizer=Path(args.tokenizer) if args.tokenizer else None, device=args.device,
        quantizer=args.quantizer, options=recipe_options(args),
    )  # fmt: skip
    ratio = result.out_bytes / max(result.in_bytes, 1)
    print(
        f"wrote {result.out} ({result.out_bytes / 1e9:.2f} GB from {result.in_bytes / 1e9:.2f} GB, "
        f"{ratio:.0%}, {result.seconds:.1f} s)"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from zimage_lite.inspect import format_report, inspect_path

    report = inspect_path(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zimage_lite.bench.runner import run_bench_from_args

    return run_bench_from_args(args)


def cmd_synthetic(args: argparse.Namespace) -> int:
    import torch

    from zimage_lite import preflight
    from zimage_lite.convert.atomic import atomic_path
    from zimage_lite.pipeline import resolve_device
    from zimage_lite.synthetic import write_synthetic_model

    out = Path(args.output)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = str(resolve_device(args.device or "cpu"))
    preflight.check_synthetic(out, args.size, dtype)
    with atomic_path(
        out, args.force, folder=True, marks=("model_index.json",)
    ) as tmp:  # Ctrl-C: nothing left
        write_synthetic_model(
            tmp,
            size=args.size,
            seed=args.seed,
            dtype=dtype,
            device=device,
            variant=args.variant,
            outliers=args.outliers,
            stress=args.stress,
        )
    stress = f" (stress: {args.stress})" if args.stress else ""
    print(f"wrote synthetic {args.size} {args.variant} model to {out}{stress}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zimage_lite.cli_guidance import add_guidance_arguments

    parser = _Parser(prog="zimage-lite", description="Z-Image-Turbo on 4-8 GB GPUs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="make images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", help="diffusers-layout folder, converted folder, or Hugging Face repo id")
    g.add_argument("--transformer", help="transformer file or folder (overrides the model's)")
    g.add_argument("--text-encoder", help="text encoder file or folder (overrides the model's)")
    g.add_argument("--vae", help="VAE file or folder (overrides the model's)")
    g.add_argument("--tokenizer", help="tokenizer.json or its folder (not needed with a GGUF text encoder)")
    g.add_argument(
        "--steps", type=cli_args.steps, default=None, help="default: the model variant's (8 Turbo)"
    )
    g.add_argument("--seed", type=cli_args.seed, default=0, help=f"0 to {cli_args.SEED_MAX}")
    size_help = "pixels, a multiple of 16 (default: the init image's, else 1024)"
    g.add_argument("--width", type=cli_args.image_size, default=None, help=size_help)
    g.add_argument("--height", type=cli_args.image_size, default=None, help=size_help)
    g.add_argument("--batch", type=cli_args.batch, default=1, help="images per prompt")
    g.add_argument("--batch-index", type=cli_args.batch_index, default=None, metavar="I",
                   help="remake only image I of a --batch run (what its file records as batch_index)")  # fmt: skip
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    g.add_argument(
        "--vram",
        type=cli_args.vram,
        default=None,
        help="VRAM budget (4GB, 6GB, 8GB, auto): weights stream from host memory to fit it",
    )
    g.add_argument(
        "--card",
        type=cli_args.card,
        default=None,
        help="run as on a card of this size (4GB, 6GB, 8GB): caps the GPU allocator as such a card would "
        "and plans in its budget, so a big GPU shows what a small one will do",
    )
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    g.add_argument(
        "--fp8-matmul", choices=["dequant", "native"], default="dequant",
        help="FP8 weights: dequantize to the compute dtype (default) or run on the FP8 tensor cores "
        "(sm >= 8.9; elsewhere it falls back to dequant with a warning)",
    )  # fmt: skip
    g.add_argument("--init-image", help="image-to-image from this picture (resized to the output size)")
    g.add_argument("--strength", type=cli_args.strength, default=None,
                   help="how much of the init image to re-generate, 0-1 (default 0.6; 1.0 with --mask)")  # fmt: skip
    g.add_argument("--mask", help="inpainting mask for --init-image: white is re-generated, black kept")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA (safetensors) with this scale (default 1.0); repeatable")  # fmt: skip
    g.add_argument("--hires", type=cli_args.hires_scale, default=None, metavar="SCALE",
                   help="hires fix: upscale each image by SCALE (e.g. 1.5) and re-generate detail")  # fmt: skip
    g.add_argument("--hires-strength", type=cli_args.strength, default=0.35,
                   help="strength of the hires pass (0.3-0.4)")  # fmt: skip
    add_guidance_arguments(g)
    cli_control.add_control_args(g)
    g.add_argument("-o", "--output", type=cli_args.output_file, default="out.png",
                   help="image file: .png, .jpg or .webp (a batch writes NAME-0.png, NAME-1.png, ...)")  # fmt: skip
    g.add_argument("--stats", type=cli_args.output_file, help="write timings and memory as JSON here")
    g.add_argument("--force", action="store_true", help="replace existing output files")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="quantize a checkpoint to GGUF / FP8 (a model folder or one file)")
    c.add_argument("src", help="diffusers model folder, component folder, .safetensors or .gguf file")
    c.add_argument(
        "-o",
        "--output",
        type=cli_args.convert_output,
        required=True,
        help="output folder (for a model) or file",
    )
    c.add_argument("--quant", help="bf16, q8_0, q6_k, q5_k, q4_k, q4_0, fp8, q4_k_m, q5_k_m, q3_k, q3_k_m")
    c.add_argument("--force", action="store_true", help="replace an existing output")
    c.add_argument(
        "--threads", type=cli_args.threads, default=None, help="quantization threads (default: all cores)"
    )
    c.add_argument("--tokenizer", help="tokenizer folder to embed in a text-encoder GGUF")
    c.add_argument(
        "--device",
        type=cli_args.torch_device,
        default=None,
        help="quantize on this torch device (e.g. cuda: q8_0, q4_0, fp8, bf16 only)",
    )
    c.add_argument(
        "--quantizer", choices=["ggml", "torch"], default=None,
        help="force ggml's own quantizers (CPU) or zimage-lite's torch fallback (default: ggml where installed)",
    )  # fmt: skip
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from zimage_lite.cli_imatrix import add_recipe_arguments

    add_recipe_arguments(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="what a checkpoint file or folder holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="time and compare every precision against the BF16 reference")
    from zimage_lite.bench.runner import add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("synthetic", help="write a random-weight model of the real architecture (tests, demo)")
    s.add_argument("output", type=cli_args.output_folder)
    s.add_argument("--size", choices=["tiny", "small", "small-k", "full"], default="tiny")
    s.add_argument("--outliers", action="store_true",
                   help="a few outlier input channels in every layer, as trained models have (imatrix tests)")  # fmt: skip
    s.add_argument("--seed", type=cli_args.seed, default=0)
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument(
        "--variant", choices=["turbo", "base"], default="turbo", help="its scheduler config's variant"
    )
    s.add_argument(
        "--device", choices=["cpu", "cuda"], default=None,
        help="draw the values there (cuda: the full model in seconds; other values for the same seed)",
    )  # fmt: skip
    s.add_argument("--stress", choices=["fp16"], default=None,
                   help="fp16: a few weights scaled so activations outgrow float16 as Z-Image's do")  # fmt: skip
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_synthetic)
    from zimage_lite.cli_imatrix import add_imatrix_arguments, cmd_imatrix

    m = sub.add_parser("imatrix", help="gather an importance matrix (for convert --imatrix) by generating")
    add_imatrix_arguments(m)
    m.set_defaults(func=cmd_imatrix)
    from zimage_lite.serve.cli import add_parser as add_serve_parser

    v = add_serve_parser(sub)
    for command in (g, c, i, b, s, m, v):  # -v after the command too; SUPPRESS keeps a -v given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 2 for a failure the user or machine caused, 130 for
    Ctrl-C, 1 for a bug), having printed one line on stderr for any failure."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad argument whose one line _Parser.error printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    done = len(committed())
    try:
        with sigterm_raises():
            code = args.func(args)
            sys.stdout.flush()  # a closed pipe fails here, not at exit after the return
            return code
    except BrokenPipeError:  # `inspect --json | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt, Terminated) as exc:
        message, code = describe(exc, committed()[done:])
        if args.verbose:
            traceback.print_exc()
        print(f"zimage-lite: error: {one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
