"""`generate`'s ControlNet options: added to its parser here, turned into `generate()` keywords here.

`--control-preprocess canny` makes an edge map with OpenCV (the optional `[control]` extra); every other
map (depth, pose, HED, lines, tiles) is given as an image, made by the user's tool of choice.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from zimage_lite.errors import UsageError

PREPROCESSORS = ("none", "canny")
CANNY_THRESHOLDS = (100, 200)  # controlnet_aux's CannyDetector defaults (0-255 gradient magnitudes)


def _closed_range(low: float, high: float):
    """An argparse type: a number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} (got {text})")
        return value

    return parse


_fraction = _closed_range(0.0, 1.0)
_scale = _closed_range(0.0, 4.0)


def add_control_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--controlnet", help="Fun-Controlnet-Union file or folder (v1, 2.0, 2.1, 2.1-lite; any layout)"
    )
    g.add_argument("--control", metavar="IMAGE", help="control map (edges, depth, pose, ...) or, with "
                   "--control-preprocess, a picture to make one from")  # fmt: skip
    g.add_argument("--control-scale", type=_scale, default=0.75, help="strength of the hints (default 0.75)")
    g.add_argument(
        "--control-start", type=_fraction, default=0.0, help="fraction of the schedule where control starts"
    )
    g.add_argument(
        "--control-end", type=_fraction, default=1.0, help="fraction of the schedule where it ends"
    )
    g.add_argument("--control-preprocess", choices=PREPROCESSORS, default="none",
                   help="make the control map from --control: canny edges (needs opencv-python-headless)")  # fmt: skip
    g.add_argument(
        "--control-inpaint", metavar="IMAGE", help="ControlNet inpainting (2.x): the picture to repaint"
    )
    g.add_argument(
        "--control-mask", metavar="MASK", help="ControlNet inpainting: white is repainted, black kept"
    )


def canny(image: Image.Image, width: int, height: int) -> Image.Image:
    """An RGB edge map of `image` resized to width x height (Lanczos), white edges on black."""
    try:
        import cv2
    except ImportError:
        raise UsageError(
            "--control-preprocess canny needs OpenCV: pip install 'zimage-lite[control]'"
        ) from None
    gray = np.asarray(image.resize((width, height), Image.LANCZOS).convert("L"))
    edges = cv2.Canny(gray, *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


def control_inputs(args: argparse.Namespace) -> dict:
    """generate() keywords for the control options (after --width/--height are settled)."""
    from zimage_lite.init_image import open_image

    if args.control is None:
        given = [o for o in ("control_inpaint", "control_mask") if getattr(args, o) is not None]
        if given or args.control_preprocess != "none":
            raise UsageError("the --control-* options need --control IMAGE")
        return {}
    if args.controlnet is None:
        raise UsageError("--control needs --controlnet PATH")
    if args.control_start >= args.control_end:
        raise UsageError(
            f"--control-start {args.control_start:g} must be below --control-end {args.control_end:g}"
        )
    image = open_image(args.control, "control image")
    if args.control_preprocess == "canny":
        image = canny(image, args.width, args.height)
    inputs = {"control_image": image, "control_scale": args.control_scale,
              "control_start": args.control_start, "control_end": args.control_end}  # fmt: skip
    if args.control_inpaint is not None:
        inputs["control_inpaint"] = open_image(args.control_inpaint, "inpaint image")
    if args.control_mask is not None:
        inputs["control_mask"] = open_image(args.control_mask, "mask")
    return inputs


def hires_inputs(inputs: dict) -> dict:
    """The control keywords for the hires pass: the same control, resized to the larger size there."""
    return {k: v for k, v in inputs.items() if k.startswith("control_")}


def control_meta(args: argparse.Namespace) -> dict[str, str]:
    """PNG text for the control options."""
    if args.control is None:
        return {}
    meta = {"controlnet": str(args.controlnet), "control": str(args.control),
            "control_scale": f"{args.control_scale:g}",
            "control_range": f"{args.control_start:g}-{args.control_end:g}"}  # fmt: skip
    if args.control_preprocess != "none":
        meta["control_preprocess"] = args.control_preprocess
    return meta
