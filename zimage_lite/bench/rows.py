"""`RowResult`: what one row of the benchmark measured, shared by the runner and the baselines."""

from __future__ import annotations

from dataclasses import dataclass, field

from zimage_lite.bench.engines import Sample


@dataclass
class RowResult:
    """What one row measured; report.build_row turns it into the JSON row."""

    name: str
    kind: str
    precision: str
    card: str | None = None  # the card this row emulates (--card), None: the whole device or --vram
    hires: float | None = None  # hires-fix scale (--hires): generate, upscale, image-to-image
    guidance: float | None = None  # CFG scale (--cfg); None: the model's default (Turbo: none)
    control: bool = False  # with the ControlNet (--controlnet) at this precision, the bench's control map
    dtype: str | None = None  # compute dtype of an --also-dtype row (None: the bench's --dtype)
    imatrix: bool = False  # converted with the bench's --imatrix (bench/calibrated.py)
    target_size: str | None = None  # converted with convert --target-size this size (a target:<size> row)
    rules: bool = False  # converted with the bench's --tensor-type-rules (a <precision>+rules row)
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    engine: object | None = None  # filled while running; not reported
    samples: list[Sample] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)
    thumbs: list = field(default_factory=list)  # PIL thumbnails in (prompt, seed) order, for the grid
    info: dict = field(default_factory=dict)  # load_s, compute_dtype, files, vram, convert, deterministic...
    # per "prompt_id s<seed>": seconds of each round's generation (rounds interleave the rows' repeats)
    repeat_s: dict[str, list[float]] = field(default_factory=dict)
    load_1m: list[float] = field(default_factory=list)  # the machine's 1-minute load at each timed sample
    first: dict = field(default_factory=dict)  # (prompt_id, seed) -> round 0's Generation and quality entry
