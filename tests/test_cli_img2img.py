"""`zimage-lite generate` with --init-image / --mask / --strength / --hires / --lora: the same pixels as the
Python API, both passes in the PNG metadata, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

from zimage_lite.cli import main, parse_lora
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.lora import linear_shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("cli") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny):
    return Pipeline.load(tiny, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def files(tiny, pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "in.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name, (n_out, n_in) in linear_shapes(pipe.transformer).items():
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, n_in, generator=gen) * 0.2
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(n_out, 2, generator=gen) * 0.2
    save_file(lora, str(root / "style.safetensors"))
    save_file({"layers.0.attention.qkv.lora_A.weight": torch.zeros(2, 7)}, str(root / "bad.safetensors"))
    return root


def run(capsys, tiny, *argv):
    code = main(["generate", "a lighthouse", "--model", str(tiny), "--device", "cpu", "--steps", "4", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(int)


def test_init_image_and_mask_as_the_api(tiny, pipe, files, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, _, _ = run(capsys, tiny, "--init-image", str(files / "in.png"), "--mask", str(files / "mask.png"),
                     "--strength", "0.8", "-o", str(out))  # fmt: skip
    assert code == 0
    img = Image.open(out)
    assert img.size == (64, 48)  # the init image's size, as no --width/--height was given
    assert img.text["init_image"].endswith("in.png") and img.text["strength"] == "0.8"
    assert img.text["mask"].endswith("mask.png")
    api = pipe.generate("a lighthouse", steps=4, width=64, height=48, image=Image.open(files / "in.png"),
                        mask=Image.open(files / "mask.png"), strength=0.8)[0]  # fmt: skip
    assert np.array_equal(pixels(img), pixels(api))


def exif_turned_jpeg(path, pixels: np.ndarray) -> Image.Image:
    """`pixels` stored as they are, tagged EXIF Orientation=6 (shown turned 90 degrees clockwise, as a
    phone held upright writes it); returns the image as a viewer shows it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (pixels.shape[0], pixels.shape[1])  # (W, H) of the turned picture
    return upright


def test_exif_orientation_of_init_image_and_mask_is_applied(tiny, pipe, tmp_path, capsys):
    rng = np.random.default_rng(3)
    image = exif_turned_jpeg(tmp_path / "photo.jpg", rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    stored_mask = np.zeros((32, 64), np.uint8)
    stored_mask[:, :32] = 255  # the stored left half: the top half once turned
    mask = exif_turned_jpeg(tmp_path / "mask.jpg", stored_mask)
    out = tmp_path / "e.png"
    code, _, err = run(capsys, tiny, "--init-image", str(tmp_path / "photo.jpg"), "--mask",
                       str(tmp_path / "mask.jpg"), "--strength", "0.9", "-o", str(out))  # fmt: skip
    assert code == 0, err
    img = Image.open(out)
    assert img.size == (32, 64)  # as shown, not as stored (64x32)
    api = pipe.generate("a lighthouse", steps=4, width=32, height=64, image=image, mask=mask, strength=0.9)[0]
    assert np.array_equal(pixels(img), pixels(api))


def test_hires_fix_in_one_command(tiny, pipe, files, tmp_path, capsys):
    out, stats = tmp_path / "h.png", tmp_path / "h.json"
    code, _, _ = run(capsys, tiny, "--width", "32", "--height", "48", "--hires", "1.5", "--hires-strength",
                     "0.4", "--lora", f"{files / 'style.safetensors'}:0.5", "-o", str(out), "--stats", str(stats))  # fmt: skip
    assert code == 0
    img = Image.open(out)
    assert img.size == (48, 64) and img.text["size"] == "48x64" and img.text["first_pass_size"] == "32x48"
    assert img.text["hires"].startswith("1.5x, strength 0.4")
    assert img.text["loras"].endswith("style.safetensors:0.5")
    data = json.loads(stats.read_text())
    assert len(data["steps_s"]) == 4 and len(data["hires_passes"][0]["steps_s"]) == 2  # 4 - int(4 - 1.6)
    pipe.load_lora(files / "style.safetensors", 0.5)
    try:
        first = pipe.generate("a lighthouse", steps=4, width=32, height=48)[0]
        api = pipe.hires_fix(first, "a lighthouse", scale=1.5, strength=0.4, steps=4)[0]
    finally:
        pipe.unload_loras()
    assert np.array_equal(pixels(img), pixels(api))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mask", "m.png"], "need --init-image"),
        (["--init-image", "missing.png"], "no such init image file"),
        (["--lora", "BAD"], "bad.safetensors"),
        (["--hires", "0.8"], "--hires: must be above 1"),
    ],
)
def test_errors_are_one_line(tiny, files, tmp_path, capsys, argv, message):
    argv = [str(files / "bad.safetensors") if a == "BAD" else a for a in argv]
    out = tmp_path / "x.png"
    code, _, err = run(capsys, tiny, "--width", "32", "--height", "32", *argv, "-o", str(out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_parse_lora():
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert parse_lora(r"C:\loras\style.safetensors:-0.5") == (r"C:\loras\style.safetensors", -0.5)
