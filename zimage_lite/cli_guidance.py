"""`generate` options for the model variant and classifier-free guidance (guidance.py, variants.py)."""

from __future__ import annotations

import argparse

from zimage_lite import cli_args
from zimage_lite.variants import VARIANTS


def add_guidance_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--variant", choices=list(VARIANTS), default=None,
                   help="whose defaults apply: turbo (8 steps, no guidance) or base (50 steps, guidance 4); "
                   "default: read from the model's files")  # fmt: skip
    g.add_argument("--guidance", type=cli_args.non_negative, default=None, metavar="G",
                   help="classifier-free guidance scale, pred = pos + G (pos - neg); 0 = none, no negative "
                   "pass (default: the model variant's)")  # fmt: skip
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="what the guidance steers away from (default: the empty prompt)")  # fmt: skip
    g.add_argument("--cfg-normalization", type=cli_args.non_negative, default=None, metavar="F",
                   help="cap the guided prediction's norm at F x the positive one's; 0 = off (default)")  # fmt: skip
    g.add_argument("--cfg-truncation", type=cli_args.non_negative, default=None, metavar="F",
                   help="no guidance once the step's normalised time passes F (0-1; default 1 = every step)")  # fmt: skip


def guidance_kwargs(args: argparse.Namespace) -> dict:
    """Pipeline.generate keywords from the options (None: the model variant's default)."""
    return {
        "guidance": args.guidance,
        "negative_prompt": args.negative_prompt,
        "cfg_normalization": args.cfg_normalization,
        "cfg_truncation": args.cfg_truncation,
    }


def guidance_meta(pipe, args: argparse.Namespace) -> dict[str, str]:
    """PNG text: the variant and the guidance actually used (defaults resolved)."""
    steps, cfg = pipe.sampling_settings(
        args.steps, args.guidance, args.cfg_normalization, args.cfg_truncation
    )
    meta = {"variant": pipe.variant.name, "steps": str(steps), "guidance": f"{cfg.scale:g}"}
    if cfg.active:
        meta["negative_prompt"] = args.negative_prompt or ""
        meta["cfg_normalization"] = f"{cfg.normalization:g}"
        meta["cfg_truncation"] = f"{cfg.truncation:g}"
    return meta
