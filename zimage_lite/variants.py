"""Which Z-Image a model folder holds (Turbo or base) and the sampling defaults that come with it.

The published checkpoints differ in their scheduler and in how they are meant to be sampled; the
architecture is the same. Defaults, with where each number comes from:

| variant | steps | guidance | cfg_normalization | cfg_truncation | scheduler shift | source |
|---|---|---|---|---|---|---|
| turbo | 8 | 0 (no negative pass) | off | 1.0 | 3.0 | Tongyi-MAI/Z-Image-Turbo model card and diffusers' ZImagePipeline example (guidance_scale=0.0; the card's "9 steps" are 8 transformer calls) |
| base | 50 | 4.0 | off | 1.0 | 6.0 | Tongyi-MAI/Z-Image model card, its diffusers example: num_inference_steps=50, guidance_scale=4, cfg_normalization=False (the card: 28-50 steps, guidance 3-5; normalization on for realism, off for style) |

cfg_truncation 1.0 (guidance at every step) is diffusers' default; neither card changes it.

How the variant is decided, first match wins: the caller's `variant`; the `variant` of a converted
folder's manifest (zimage-lite.json, written by `convert`); the shift in `scheduler/scheduler_config.json`
(3.0 Turbo, 6.0 base, as published); else Turbo. The scheduler itself is always read from the folder's
`scheduler/scheduler_config.json` when there is one (single files: the variant's published config).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from zimage_lite.config import SchedulerConfig
from zimage_lite.errors import CheckpointError, UsageError
from zimage_lite.weights.components import MANIFEST

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int
    guidance: float
    cfg_normalization: float
    cfg_truncation: float
    shift: float  # the published scheduler_config.json's


VARIANTS: dict[str, SamplingDefaults] = {
    "turbo": SamplingDefaults(steps=8, guidance=0.0, cfg_normalization=0.0, cfg_truncation=1.0, shift=3.0),
    "base": SamplingDefaults(steps=50, guidance=4.0, cfg_normalization=0.0, cfg_truncation=1.0, shift=6.0),
}


@dataclass(frozen=True)
class ModelVariant:
    """A model's variant, its sampling defaults, its scheduler, and how the variant was decided."""

    name: str
    scheduler: SchedulerConfig
    decided_by: str

    @property
    def defaults(self) -> SamplingDefaults:
        return VARIANTS[self.name]


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise UsageError(f"unknown model variant {name!r}: choose {' or '.join(VARIANTS)}")
    return name


def _manifest_variant(root: Path) -> str | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("variant")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    return None if name is None else check_variant(str(name))


def read_scheduler(root: Path | None) -> SchedulerConfig | None:
    """The folder's scheduler config, None when it has none."""
    if root is None or not (root / SCHEDULER_CONFIG).is_file():
        return None
    return SchedulerConfig.from_json(root / SCHEDULER_CONFIG)


def _by_shift(scheduler: SchedulerConfig | None) -> str | None:
    if scheduler is None:
        return None
    return next((name for name, d in VARIANTS.items() if d.shift == scheduler.shift), None)


def read_variant(root: Path | None, variant: str | None = None) -> ModelVariant:
    """The variant of the model folder `root` (None: single files), `variant` overriding it."""
    scheduler = read_scheduler(root)
    hints = (
        ("the caller", variant),
        ("the manifest", None if root is None else _manifest_variant(root)),
        ("the scheduler's shift", _by_shift(scheduler)),
        ("no other hint (Turbo assumed)", "turbo"),
    )
    decided_by, name = next((by, check_variant(name)) for by, name in hints if name is not None)
    if scheduler is None:
        scheduler = SchedulerConfig(shift=VARIANTS[name].shift)
    log.info("model variant %s (decided by %s), scheduler shift %g", name, decided_by, scheduler.shift)
    return ModelVariant(name, scheduler, decided_by)
