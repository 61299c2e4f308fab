"""Uploaded images: decoded only after their header says the size is within the limit (a decompression
bomb is a small file that claims a huge image); OpenAI's mask convention turned into ours."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from zimage_lite.serve.errors import bad_request
from zimage_lite.upright import upright


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """A fully decoded PIL image from uploaded bytes, upright as its EXIF says, or a 400 naming `param`."""
    too_large = (Image.DecompressionBombWarning, Image.DecompressionBombError)  # PIL's own, larger bound
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:  # from the header: nothing is decoded yet
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                im.load()
                return upright(im)
    except too_large as exc:
        raise bad_request(f"{param} is too large ({exc}); this server takes {max_pixels} pixels at most",
                          param, "image_too_large") from None  # fmt: skip
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_request(f"{param} is not a readable image ({type(exc).__name__})", param,
                          "invalid_image") from None  # fmt: skip


def decode_base64_image(text: str, param: str, max_pixels: int) -> Image.Image:
    """An image sent in JSON as base64 (a `data:image/...;base64,` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param, "invalid_image") from None
    return decode_image(data, param, max_pixels)


def openai_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's mask (same size as the image; fully transparent pixels are edited) -> ours (L mode,
    white = re-generate). A mask without an alpha channel is refused: it could mean either."""
    if mask.size != image.size:
        raise bad_request(f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}: "
                          "they must be the same size", "mask", "mask_size_mismatch")  # fmt: skip
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise bad_request("mask needs an alpha channel: its transparent pixels are the ones edited", "mask",
                          "invalid_mask")  # fmt: skip
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a < 128 else 0)


def request_images(image, mask, control, decode, max_pixels: int) -> dict:
    """init_images plus {"control_image"} from the request's base64 `control` (None: none)."""
    out = init_images(image, mask, decode, max_pixels)
    if control is not None:
        out["control_image"] = decode_base64_image(control, "control_image", max_pixels)
    return out


def init_images(image, mask, decode, max_pixels: int) -> dict:
    """{"image", "mask"} for a request from its uploaded forms (bytes, or base64 text) through `decode`:
    the mask in OpenAI's convention turned into ours. Run off the event loop (decoding takes a while)."""
    if image is None:
        if mask is not None:
            raise bad_request("a mask needs an image", "mask")
        return {}
    out = {"image": decode(image, "image", max_pixels)}
    if mask is not None:
        out["mask"] = openai_mask(decode(mask, "mask", max_pixels), out["image"])
    return out
