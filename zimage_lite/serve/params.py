"""What the worker runs: a validated request as plain frozen values (schemas.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class LoraChoice:
    name: str  # a file stem in --lora-dir; never a path
    scale: float = 1.0


@dataclass(frozen=True)
class Hires:
    scale: float
    strength: float = 0.35


DEFAULT_CONTROL_SCALE = 0.75  # Pipeline.generate's and generate --control-scale's


@dataclass(frozen=True)
class Control:
    """A ControlNet input: Pipeline.generate's control_* keywords."""

    image: Image.Image = field(compare=False, repr=False)
    scale: float = DEFAULT_CONTROL_SCALE
    start: float = 0.0  # fractions of the schedule where the hints join and leave
    end: float = 1.0

    def kwargs(self) -> dict:
        return {"control_image": self.image, "control_scale": self.scale, "control_start": self.start,
                "control_end": self.end}  # fmt: skip


@dataclass(frozen=True)
class JobParams:
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    n: int = 1
    loras: tuple[LoraChoice, ...] = ()
    hires: Hires | None = None
    strength: float | None = None
    guidance: float | None = None  # None: the model variant's (Turbo 0, base 4)
    negative_prompt: str | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # white = re-generate
    control: Control | None = None

    def guidance_kwargs(self) -> dict:
        """Pipeline.generate's guidance keywords (absent ones take the model variant's defaults)."""
        return {"guidance": self.guidance, "negative_prompt": self.negative_prompt}

    def control_kwargs(self) -> dict:
        """Pipeline.generate's control keywords (both passes: the hires pass resizes the control image)."""
        return {} if self.control is None else self.control.kwargs()

    def passes(self) -> int:
        return 1 if self.hires is None else 2


@dataclass(frozen=True)
class OutputSpec:
    format: str = "png"  # png | jpeg | webp
    compression: int | None = None  # JPEG/WebP quality 0-100
    response_format: str = "b64_json"  # b64_json | url

    @property
    def ext(self) -> str:
        return {"jpeg": "jpg"}.get(self.format, self.format)
