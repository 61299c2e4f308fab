"""The harness: every precision (and optional diffusers baselines) on a fixed prompt set x seeds.

The rows' repeats are interleaved: `repeats` rounds, each of which runs every row once (load, warm up
excluded from timings, one timed generation of every (prompt, seed)), so a burst of load on a shared
machine hits every row alike rather than the row that happened to run then; the report gives each
row's spread and the machine's load, and marks a row whose repeats spread too wide to compare. The
reference row runs first in each round; every other row's images and final latents (round 0's) are
compared with the reference's of the same prompt and seed. Rows that fail are recorded (status
"failed", with the reason) and the run goes on; a failing reference ends the run.

The report folder is written under a temporary name and renamed when complete (convert/atomic.py): an
interrupted or failed bench leaves nothing, and an existing report is replaced only with --force.

Entry points: `add_bench_arguments(parser)` + `run_bench_from_args(args)` for the CLI, `run_bench(cfg)`
for Python.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zimage_lite.bench import calibrated, sources
from zimage_lite.bench.engines import Generation, OursEngine
from zimage_lite.bench.metrics import latent_relative_error, psnr, ssim
from zimage_lite.bench.prompts import BenchPrompt, bench_prompts
from zimage_lite.bench.rows import RowResult
from zimage_lite.errors import UsageError, ZImageError

log = logging.getLogger(__name__)

TINY_SIZE = 128  # default width/height for --synthetic tiny (seconds per image on a CPU)
THUMB = 192  # grid tile size in pixels


@dataclass
class BenchConfig:
    out: Path
    model: Path | None = None
    synthetic: str | None = None  # "tiny" | "small" | "full"
    precisions: list[str] = field(default_factory=lambda: [sources.REFERENCE])
    prompts: list[BenchPrompt] = field(default_factory=bench_prompts)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 8
    width: int = 1024
    height: int = 1024
    repeats: int = 1
    warmup: int = 1
    vram: str | None = None
    cards: list[str] = field(default_factory=list)  # --card: extra rows per precision, run as on that card
    hires: float | None = None  # --hires: extra rows per precision, the hires fix at this scale
    hires_strength: float = 0.35
    cfg: float | None = None  # --cfg: extra rows per precision, classifier-free guidance at this scale
    controlnet: Path | None = None  # --controlnet: extra rows per precision with control (bench/control.py)
    device: str | None = None
    dtype: str | None = None
    also_dtypes: list[str] = field(default_factory=list)  # --also-dtype: rows per precision in these dtypes
    imatrix: dict | None = None  # --imatrix: calibrated.imatrix_setting (file, sha256...); +imatrix rows
    target_sizes: list[str] = field(default_factory=list)  # --target-size: a target:<size> row each
    tensor_type_rules: str | None = None  # --tensor-type-rules: a <precision>+rules row per GGUF precision
    cache: Path = field(default_factory=sources.default_cache_dir)
    baselines: list[str] = field(default_factory=list)
    save_images: bool = True
    progress: bool = True
    force: bool = False  # replace an existing report folder


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `zimage-lite bench` options (see docs/bench-report-schema.md for what they produce)."""
    from zimage_lite import cli_args

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="the reference: a diffusers-layout model folder (BF16 or FP32 weights)")
    src.add_argument(
        "--synthetic",
        choices=["tiny", "small", "full"],
        help="random weights: tiny (CPU, CI), small (CPU; K-quant rows apply) or full size (GPU)",
    )
    parser.add_argument("--precisions", help="comma list, e.g. bf16,q8_0,q4_k (default: all available)")
    parser.add_argument("--prompts", type=int, help="use the first N prompts of the fixed set (default all)")
    parser.add_argument(
        "--seeds", type=cli_args.seed_list, default="0", help="comma list of seeds (default 0)"
    )
    parser.add_argument("--steps", type=cli_args.steps, default=8)
    size_help = f"default 1024 ({TINY_SIZE} with --synthetic tiny/small)"
    parser.add_argument("--width", type=cli_args.image_size, help=size_help)
    parser.add_argument("--height", type=cli_args.image_size, help=size_help)
    parser.add_argument(
        "--repeats", type=cli_args.repeats, default=1, help="timed generations per prompt and seed"
    )
    parser.add_argument("--warmup", type=cli_args.warmup, default=1, help="untimed generations per row first")
    parser.add_argument("--vram", type=cli_args.vram, help="VRAM cap passed to the runtime, e.g. 6GB")
    parser.add_argument(
        "--card",
        help="comma list of card sizes, e.g. 4GB,6GB,8GB: every precision also runs as on such a card "
        "(allocator capped as that card would cap it, planned in its budget); rows named q8_0@6GB",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPE_SHORT), help="compute dtype")
    parser.add_argument(
        "--also-dtype", type=_dtype_list, default=[], metavar="DTYPES",
        help="comma list, e.g. bfloat16,float16: every precision also runs in these compute dtypes, rows "
        "named q8_0+fp16, compared with the reference like every row",
    )  # fmt: skip
    out_help = "report folder (default bench-out)"
    parser.add_argument("--out", type=cli_args.output_folder, default="bench-out", help=out_help)
    parser.add_argument(
        "--cache",
        type=cli_args.output_folder,
        help=f"converted-model cache (default {sources.default_cache_dir()})",
    )
    parser.add_argument(
        "--hires",
        type=cli_args.hires_scale,
        help="every precision also runs the hires fix at this scale (e.g. 1.5): generate, upscale, "
        "image-to-image; rows named q8_0+hires1.5x, compared with the reference's hires images",
    )
    parser.add_argument(
        "--hires-strength", type=cli_args.strength, default=0.35, help="strength of the hires pass"
    )
    parser.add_argument(
        "--cfg", type=cli_args.non_negative, metavar="G",
        help="every precision also runs with classifier-free guidance G (empty negative prompt: two passes "
        "per step, each block uploaded once); rows named q8_0+cfg4, compared with the reference's cfg row",
    )  # fmt: skip
    parser.add_argument(
        "--controlnet",
        help="a ControlNet file, or 'synthetic' with --synthetic: every precision also runs under a fixed "
        "control map with the ControlNet at that precision; rows named q8_0+control",
    )
    parser.add_argument(
        "--imatrix", metavar="FILE",
        help="an importance matrix file (from zimage-lite imatrix; with --synthetic, gather one on the cached "
        "synthetic folder first): every GGUF precision also runs converted with it, rows named q4_k+imatrix",
    )  # fmt: skip
    parser.add_argument(
        "--target-size", action="append", metavar="SIZE",
        help="repeatable or comma list, e.g. 15MB: a row target:15MB converted with convert --target-size "
        "(with --imatrix when given), its GGUF bytes reported, to set against the preset of that size",
    )  # fmt: skip
    parser.add_argument(
        "--tensor-type-rules", metavar="REGEX=TYPE,...",
        help="convert's per-tensor rules (e.g. 'refiner=bf16'): every GGUF precision also runs converted "
        "with them (and --imatrix when given), rows named q4_k_m+rules",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", default="", help="'diffusers': add diffusers rows (needs diffusers installed)"
    )
    parser.add_argument("--no-images", action="store_true", help="do not keep each generated PNG")
    parser.add_argument("--force", action="store_true", help="replace an existing report folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma list of integers (got {text!r})") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _dtype_list(text: str) -> list[str]:
    import argparse

    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_SHORT]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(DTYPE_SHORT)} (got {text!r})")
    return dtypes


def dtype_name(precision: str, dtype: str) -> str:
    return f"{precision}+{DTYPE_SHORT[dtype]}"


def _hires(scale: float | None) -> float | None:
    if scale is not None and scale <= 1.0:
        raise UsageError(f"--hires must be above 1 (got {scale})")
    return scale


def hires_name(precision: str, scale: float) -> str:
    return f"{precision}+hires{scale:g}x"


def cfg_name(precision: str, guidance: float) -> str:
    return f"{precision}+cfg{guidance:g}"


def _reference_name(row: RowResult) -> str:
    """The row a row's images are compared with: the reference precision, in the same workflow."""
    if row.guidance is not None:
        name = cfg_name(sources.REFERENCE, row.guidance)
    else:
        name = sources.REFERENCE if row.hires is None else hires_name(sources.REFERENCE, row.hires)
    return name + "+control" if row.control else name


def _cards(text: str | None) -> list[str]:
    from zimage_lite.runtime.budget import parse_vram

    cards = [c.strip() for c in (text or "").split(",") if c.strip()]
    for c in cards:
        if parse_vram(c) is None:
            raise UsageError(f"--card takes sizes like 4GB,6GB,8GB (got {c!r})")
    return cards


def _controlnet(spec: str | None, synthetic: str | None) -> Path | None:
    if spec is None or spec != "synthetic":
        return None if spec is None else Path(spec)
    if synthetic is None:
        raise UsageError("--controlnet synthetic needs --synthetic")
    return Path("synthetic")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    default_size = TINY_SIZE if args.synthetic in ("tiny", "small") else 1024
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    baselines = [b.strip() for b in (args.baselines or "").split(",") if b.strip()]
    if any(b != "diffusers" for b in baselines):
        raise UsageError(f"unknown baseline in {args.baselines!r}: the only one is 'diffusers'")
    model = Path(args.model) if args.model else None
    if model is not None and not model.is_dir():
        raise UsageError(f"{model}: not a model folder")
    precisions = sources.parse_precisions(args.precisions)
    imatrix, sizes = calibrated.imatrix_setting(args.imatrix), calibrated.target_sizes(args.target_size)
    rules = calibrated.tensor_type_rules(args.tensor_type_rules)
    calibrated.check(precisions, sizes, imatrix, rules)
    return BenchConfig(
        out=Path(args.out), model=model, synthetic=args.synthetic,
        precisions=precisions, imatrix=imatrix, target_sizes=sizes,
        tensor_type_rules=rules, prompts=bench_prompts(args.prompts),
        seeds=_int_list(args.seeds, "--seeds"), steps=args.steps, width=args.width or default_size,
        height=args.height or default_size, repeats=args.repeats, warmup=args.warmup, vram=args.vram,
        cards=_cards(args.card), hires=_hires(args.hires), hires_strength=args.hires_strength, cfg=args.cfg,
        controlnet=_controlnet(args.controlnet, args.synthetic), also_dtypes=args.also_dtype,
        device=args.device, dtype=args.dtype, cache=Path(args.cache) if args.cache else sources.default_cache_dir(),
        baselines=baselines, save_images=not args.no_images, progress=not args.quiet, force=args.force,
    )  # fmt: skip


def run_bench_from_args(args: argparse.Namespace) -> int:
    """Run the bench for parsed CLI args; prints where the report is. 0, or 1 when a row failed."""
    report = run_bench(config_from_args(args))
    out = Path(args.out)
    print(f"wrote {out / 'report.md'} (+ report.json, grid.png, plot.png)")
    failed = [r["name"] for r in report["rows"] if r["status"] == "failed"]
    if failed:
        print(f"zimage-lite: bench rows failed: {', '.join(failed)} (reasons in report.md)", file=sys.stderr)
    return 1 if failed else 0


def run_bench(cfg: BenchConfig) -> dict:
    """Run every row, write report.json / report.md / grid.png / plot.png under cfg.out; return the report.
    The folder appears only when complete (see the module docstring)."""
    from dataclasses import replace

    from zimage_lite.bench import report
    from zimage_lite.convert.atomic import atomic_path
    from zimage_lite.pipeline import check_size

    check_size(cfg.width, cfg.height)
    _check_folders(cfg)
    with atomic_path(cfg.out, cfg.force, folder=True) as tmp:
        run = replace(cfg, out=tmp)
        reference = cfg.model or sources.synthetic_model(cfg.synthetic or "tiny", cfg.cache)
        rows = _planned_rows(cfg)
        load_before = _load_average()
        refs: dict[tuple[str, int, float | None], Generation] = {}  # the reference rows' round-0 images
        with _progress_bar(cfg, rows) as bar:
            for round_ in range(cfg.repeats):
                for row in rows:
                    if row.status == "ok":
                        _run_guarded(run, reference, row, refs, bar, round_)
        return report.write_report(run, reference, rows, load=(load_before, _load_average()))


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None


def _check_folders(cfg: BenchConfig) -> None:
    """Before anything is made: the cache can be created (a read-only home says so and names --cache),
    the report folder is not the model or the cache, and an existing report folder holds only a report
    (--force replaces a report, never a folder of other files)."""
    from zimage_lite.outputs import check_outputs

    try:
        cfg.cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the cache folder {cfg.cache} ({exc.strerror or exc}): give a writable one with --cache"
        ) from None
    if not os.access(cfg.cache, os.W_OK | os.X_OK):
        raise UsageError(f"the cache folder {cfg.cache} is not writable: give a writable one with --cache")
    inputs = {"--model": cfg.model} if cfg.model is not None else {}
    check_outputs({"--out": cfg.out, "--cache": cfg.cache}, inputs, force=True)
    if cfg.out.is_dir():
        others = sorted(p.name for p in cfg.out.iterdir() if p.name not in REPORT_FILES)
        if others:
            raise UsageError(
                f"{cfg.out} holds files that are not a bench report ({', '.join(others[:3])}): give --out a new folder"
            )
        if any(cfg.out.iterdir()) and not cfg.force:
            raise UsageError(f"{cfg.out} already holds a report; pass --force to overwrite it")


REPORT_FILES = ("report.json", "report.md", "grid.png", "plot.png", "images")


def _run_guarded(cfg: BenchConfig, reference: Path, row: RowResult, refs: dict, bar, round_: int) -> None:
    """One round of one row; a failure marks the row failed (and ends the run for the reference)."""
    bar.set_description(row.name)
    try:
        _run_row(cfg, reference, row, refs, bar, round_)
    except (ZImageError, RuntimeError, OSError, ValueError, ImportError) as exc:
        if row.name == _reference_name(row):  # the rows after it have nothing to compare with
            raise
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("row %s failed: %s", row.name, row.reason)
    finally:
        if row.engine is not None:
            row.engine.close()
            row.engine = None


def _planned_rows(cfg: BenchConfig) -> list[RowResult]:
    rows = calibrated.plain_and_imatrix_rows(cfg.precisions, cfg.imatrix, cfg.tensor_type_rules)
    rows += calibrated.target_rows(cfg.target_sizes, cfg.imatrix)
    rows += [RowResult(f"{p}@{card}", "zimage-lite", p, card) for card in cfg.cards for p in cfg.precisions]
    rows += [
        RowResult(dtype_name(p, d), "zimage-lite", p, dtype=d)
        for d in cfg.also_dtypes
        for p in cfg.precisions
    ]
    if cfg.hires is not None:
        rows += [
            RowResult(hires_name(p, cfg.hires), "zimage-lite", p, hires=cfg.hires) for p in cfg.precisions
        ]
    if cfg.cfg is not None:
        rows += [RowResult(cfg_name(p, cfg.cfg), "zimage-lite", p, guidance=cfg.cfg) for p in cfg.precisions]
    if cfg.controlnet is not None:
        rows += [RowResult(f"{p}+control", "zimage-lite", p, control=True) for p in cfg.precisions]
    if "diffusers" in cfg.baselines:
        from zimage_lite.bench.baselines import planned_baselines

        rows += planned_baselines(cfg)
    return rows


def _progress_bar(cfg: BenchConfig, rows: list[RowResult]):
    from tqdm import tqdm

    per_row = (cfg.warmup + len(cfg.prompts) * len(cfg.seeds)) * cfg.repeats
    total = per_row * sum(r.status != "skipped" for r in rows)
    return tqdm(total=total, unit="image", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)


def _open_engine(cfg: BenchConfig, reference: Path, row: RowResult):
    if row.kind != "zimage-lite":
        from zimage_lite.bench.baselines import open_baseline

        return open_baseline(cfg, reference, row)
    recipe = calibrated.recipe_options(cfg.imatrix, row, cfg.tensor_type_rules)
    folder, convert_info = sources.precision_source(reference, row.precision, cfg.cache, cfg.progress, recipe)
    row.info["source"] = str(folder)
    row.info["convert"] = convert_info
    row.info["recipe"] = calibrated.recipe_record(folder, cfg.imatrix, row, cfg.tensor_type_rules)
    _, options = sources.base_precision(row.precision)
    hires = None if row.hires is None else (row.hires, cfg.hires_strength)
    if row.control:
        options = {**options, "control": _control_source(cfg, row)}
    return OursEngine(
        folder, cfg.device, row.dtype or cfg.dtype, cfg.vram if row.card is None else None, row.card, hires,
        guidance=row.guidance, **options,
    )  # fmt: skip


def _control_source(cfg: BenchConfig, row: RowResult):
    """(ControlNet file at the row's precision, the bench's control map)."""
    from zimage_lite.bench.control import control_map

    src = cfg.controlnet
    if src == Path("synthetic"):
        src = sources.synthetic_controlnet(cfg.synthetic, cfg.cache)
    path, info = sources.controlnet_source(src, row.precision, cfg.cache, cfg.progress)
    row.info["controlnet"] = {"source": str(path), **info}
    return path, control_map(cfg.width, cfg.height)


def _run_row(cfg: BenchConfig, reference: Path, row: RowResult, refs: dict, bar, round_: int) -> None:
    """Round `round_` of a row: load, warm up, one timed generation per (prompt, seed). Round 0 also
    records the images and quality; later rounds add their times and the repeat latent error."""
    engine = row.engine = _open_engine(cfg, reference, row)
    row.info.setdefault("load_s", engine.load_seconds)
    row.info.update(
        compute_dtype=engine.compute_dtype, device=engine.device, files=engine.files, vram_cap=engine.vram,
        transformer_types=engine.transformer_types, quantizer=engine.quantizer,
        imatrix=getattr(engine, "imatrix", None),
    )  # fmt: skip
    size = dict(steps=cfg.steps, width=cfg.width, height=cfg.height)
    first = cfg.prompts[0].text, cfg.seeds[0]
    warm = None
    for _ in range(cfg.warmup):
        warm = engine.generate(*first, **size)
        bar.update(1)
    for prompt in cfg.prompts:
        for seed in cfg.seeds:
            gen = engine.generate(prompt.text, seed, **size)
            row.samples.append(gen.sample)
            row.load_1m.append((_load_average() or [None])[0])
            row.repeat_s.setdefault(f"{prompt.id} s{seed}", []).append(gen.sample.seconds)
            bar.update(1)
            _record_image(cfg, row, prompt, seed, gen, refs)
    if round_ == 0:  # the warm-up used the first prompt and seed: bit-identical latents = deterministic
        measured = row.first[(cfg.prompts[0].id, cfg.seeds[0])][0]
        row.info["deterministic"] = None if warm is None else bool((warm.latents == measured.latents).all())
        row.info["pinned_host_bytes"] = engine.pinned_host_bytes()


def _record_image(cfg, row: RowResult, prompt: BenchPrompt, seed: int, gen: Generation, refs) -> None:
    key = (prompt.id, seed)
    if key in row.first:  # a later round: only how far this repeat's latents moved
        first, entry = row.first[key]
        err = latent_relative_error(gen.latents, first.latents)
        entry["repeat_latent_rel_error"] = max(entry["repeat_latent_rel_error"], err)
        return
    if row.name == _reference_name(row):
        refs[(prompt.id, seed, row.hires, row.guidance, row.control)] = gen
    ref = refs[(prompt.id, seed, row.hires, row.guidance, row.control)]
    entry = {
        "prompt_id": prompt.id,
        "seed": seed,
        "psnr_db": psnr(gen.image, ref.image),
        "ssim": ssim(gen.image, ref.image),
        "latent_rel_error": latent_relative_error(gen.latents, ref.latents),
        "repeat_latent_rel_error": 0.0,
        "image": None,
    }
    if cfg.save_images:
        # a row's folder: ":" (target:15MB) is no file name on Windows
        rel = Path("images") / row.name.replace(":", "-") / f"{prompt.id}-s{seed}.png"
        (cfg.out / rel).parent.mkdir(parents=True, exist_ok=True)
        gen.image.save(cfg.out / rel)
        entry["image"] = rel.as_posix()
    row.first[key] = (gen, entry)
    row.quality.append(entry)
    row.thumbs.append(thumbnail(gen.image))


def thumbnail(image, size: int = THUMB):
    """Fit in size x size. Images under 128 px are enlarged by a whole factor (nearest: pixels stay sharp
    squares, and the PNG stays small) so a tiny run's grid is legible."""
    from PIL import Image

    longest = max(image.size)
    if longest > size:
        scale = size / longest
        new = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        return image.resize(new, Image.Resampling.LANCZOS)
    k = max(1, 128 // longest)
    return image.resize((image.size[0] * k, image.size[1] * k), Image.Resampling.NEAREST)
