"""`zimage-lite serve`: its arguments and its command. zimage_lite/cli.py calls `add_parser` and nothing
else; FastAPI, uvicorn and Ray are imported only when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from zimage_lite import cli_args
from zimage_lite.errors import UsageError
from zimage_lite.serve.config import Limits, ModelOptions, ServeConfig

API_KEY_ENV = "ZIMAGE_API_KEY"  # a key on the command line shows in `ps`; the environment does not


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return cli_args.image_size(w), cli_args.image_size(h)


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="keep the model warm behind an OpenAI-compatible HTTP API")
    s.add_argument("--model", help="diffusers-layout folder, converted folder, or Hugging Face repo id")
    for name in ("transformer", "text-encoder", "vae", "tokenizer"):
        s.add_argument(f"--{name}", help=f"{name} file or folder (overrides the model's)")
    s.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    s.add_argument("--vram", default=None, help="VRAM budget (4GB, 6GB, 8GB, auto)")
    s.add_argument("--card", default=None, help="run as on a card of this size (see generate --card)")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    s.add_argument("--fp8-matmul", choices=["dequant", "native"], default="dequant")
    s.add_argument("--variant", choices=["turbo", "base"], default=None,
                   help="the model's sampling defaults (default: from its files)")  # fmt: skip
    s.add_argument("--controlnet", default=None,
                   help="Fun-Controlnet-Union file or folder: requests may send control_image")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --api-key")
    s.add_argument("--port", type=cli_args.bounded_int(0, 65535), default=8000)
    s.add_argument("--api-key", default=None, help=f"Bearer token clients must send (or ${API_KEY_ENV})")
    s.add_argument("--lora-dir", type=Path, default=None, help="LoRAs requests may name (file stems)")
    s.add_argument("--output-dir", type=Path, default=None,
                   help="where response_format=url files go (default: a temporary folder)")  # fmt: skip
    s.add_argument("--file-ttl", type=float, default=3600.0, help="seconds a url stays valid")
    s.add_argument(
        "--max-queue", type=cli_args.bounded_int(1, 10000), default=16, help="jobs waiting at most"
    )
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    s.add_argument("--grace", type=float, default=30.0, help="SIGTERM: seconds the running job may finish in")
    s.add_argument(
        "--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)"
    )
    s.add_argument("--model-id", default=None, help="the `model` name clients use (default: the folder's)")
    s.add_argument("--steps", type=cli_args.steps, default=None,
                   help="default steps, quality=medium (default: the model variant's, Turbo 8)")  # fmt: skip
    s.add_argument("--size", type=_size, default=(1024, 1024), help="default WxH")
    s.add_argument("--max-n", type=cli_args.bounded_int(1, 64), default=4)
    s.add_argument("--max-steps", type=cli_args.steps, default=100)
    s.add_argument("--max-pixels", type=cli_args.bounded_int(256, 8192 * 8192), default=2048 * 2048)
    s.add_argument("--prompt-cache", type=cli_args.bounded_int(0, 100000), default=64,
                   help="prompts whose text features are kept")  # fmt: skip
    s.add_argument("--replicas", type=cli_args.bounded_int(1, 1024), default=None,
                   help="deploy N replicas on Ray Serve (one per GPU; needs zimage-lite[cluster])")  # fmt: skip
    s.set_defaults(func=cmd_serve)
    return s


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    model = ModelOptions(
        args.model, args.transformer, args.text_encoder, args.vae, args.tokenizer, args.device, args.dtype,
        args.vram, args.card, args.fp8_matmul, args.variant, args.controlnet,
    )  # fmt: skip
    limits = Limits(max_n=args.max_n, max_steps=args.max_steps, max_pixels=args.max_pixels)
    config = ServeConfig(
        model=model, model_id=args.model_id, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, lora_dir=args.lora_dir,
        output_dir=args.output_dir, file_ttl_s=args.file_ttl, max_queue=args.max_queue,
        request_timeout_s=args.timeout, grace_s=args.grace, cors_origins=tuple(args.cors_origin),
        default_steps=args.steps, default_size=args.size, prompt_cache_size=args.prompt_cache,
        verbose=getattr(args, "verbose", False), limits=limits,
    )  # fmt: skip
    check_config(config)
    return config


def check_config(config: ServeConfig) -> None:
    if config.needs_key() and not config.api_key:
        raise UsageError(f"--host {config.host} is reachable from other machines: give --api-key (or "
                         f"${API_KEY_ENV}), or bind 127.0.0.1")  # fmt: skip
    if config.lora_dir is not None and not config.lora_dir.is_dir():
        raise UsageError(f"--lora-dir {config.lora_dir}: no such folder")
    if config.output_dir is not None and config.output_dir.exists() and not config.output_dir.is_dir():
        raise UsageError(f"--output-dir {config.output_dir} is not a folder")
    w, h = config.default_size
    if w * h > config.limits.max_pixels:
        raise UsageError(f"--size {w}x{h} is over --max-pixels {config.limits.max_pixels}")
    for name, value in (("--grace", config.grace_s), ("--timeout", config.request_timeout_s),
                        ("--file-ttl", config.file_ttl_s)):  # fmt: skip
        if not value > 0:
            raise UsageError(f"{name} must be above 0 (got {value})")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"serve needs the serve extra: pip install 'zimage-lite[serve]' ({exc})") from None
    config = config_from_args(args)
    logging.getLogger("zimage_lite.serve.access").setLevel(logging.INFO)
    if args.replicas is not None:
        from zimage_lite.serve.ray_app import run_replicas

        return run_replicas(config, args.replicas)
    from zimage_lite.serve.engine import Engine
    from zimage_lite.serve.uvicorn_run import serve_forever

    engine = Engine.load(config)  # before binding: a bad model is one error line, not a dead server
    print(f"serving {engine.model_id} at http://{config.host}:{config.port} (Ctrl-C or SIGTERM to stop)",
          flush=True)  # fmt: skip
    serve_forever(config, engine)
    print("stopped", flush=True)
    return 0
