"""The server's settings: one frozen dataclass, filled from the command line (cli.py) or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 400 (or 413 for the body) naming the field."""

    max_body_bytes: int = 32 << 20
    max_pixels: int = 2048 * 2048  # output width x height
    max_upload_pixels: int = 4096 * 4096  # an uploaded image's, checked from its header before decoding
    max_n: int = 4
    max_steps: int = 100
    max_prompt_chars: int = 8000  # the text encoder keeps 512 tokens; this bounds the tokenizer's work
    max_loras: int = 4


@dataclass(frozen=True)
class ModelOptions:
    """`generate`'s model, device, dtype and budget options, passed to Pipeline.load as they are."""

    model: str | None = None
    transformer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    dtype: str | None = None
    vram: str | None = None
    card: str | None = None
    fp8_matmul: str = "dequant"
    variant: str | None = None  # turbo | base; None: from the model's files
    controlnet: str | None = None  # a Fun-Controlnet-Union file or folder (generate --controlnet)


@dataclass(frozen=True)
class ServeConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    model_id: str | None = None  # the name clients pass as `model`; default: the model folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    lora_dir: Path | None = None
    output_dir: Path | None = None  # None: a temporary folder removed at exit
    file_ttl_s: float = 3600.0
    max_queue: int = 16
    request_timeout_s: float = 600.0
    grace_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    default_steps: int | None = None  # None: the model variant's (Turbo 8, base 50)
    default_size: tuple[int, int] = (1024, 1024)
    prompt_cache_size: int = 64
    verbose: bool = False
    limits: Limits = field(default_factory=Limits)
    replica: str | None = None  # the X-Zimage-Replica header value; default: host name and pid

    def needs_key(self) -> bool:
        return self.host not in LOOPBACK
