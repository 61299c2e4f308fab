"""Issue 19, the second round of bad inputs: each one ends with one line, exit 2, and nothing lost.

Crashes (non-UTF-8 prompts, rank-0 or NaN LoRAs, truncated GGUF files), misleading messages (LoRA scales,
inspect on a device or FIFO, --model on a file, negative --vram, the VAE's minimum).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zimage_lite.cli import main
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("inputs") / "tiny", "tiny", seed=0)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(capsys, *argv, exit_code: int = 2) -> str:
    """The one stderr line of a failing command (asserted: one line, the exit code, no traceback)."""
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def gen(tiny, out: Path, *extra) -> list:
    size = ["--width", 32, "--height", 32, "--steps", 1, "-q"]
    return ["generate", "x", "--model", tiny, *size, "-o", out, *extra]


# -- crashes -----------------------------------------------------------------------------------------
def test_prompt_that_is_not_utf8(tiny, tmp_path, capsys):
    # what Python makes of `generate "$(printf 'a \xff\xfe cat \x80')"`: lone surrogates for the bytes
    prompt = os.fsdecode(b"a \xff\xfe cat \x80")
    argv = gen(tiny, tmp_path / "a.png")
    argv[1] = prompt
    line = error_line(capsys, *argv)
    assert line == (
        "zimage-lite: error: the prompt is not valid UTF-8 text (byte 0xff at character 2): type it again, "
        "or set a UTF-8 locale (LANG=C.UTF-8)"
    )
    assert not list(tmp_path.iterdir())


def _lora(path: Path, rank: int, value: float = 0.1, alpha=None) -> Path:
    tensors = {
        "transformer.layers.0.attention.to_q.lora_A.weight": torch.full((rank, 64), value),
        "transformer.layers.0.attention.to_q.lora_B.weight": torch.full((64, rank), 0.1),
    }
    if alpha is not None:
        tensors["transformer.layers.0.attention.to_q.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_lora_of_rank_zero(tiny, tmp_path, capsys):
    lora = _lora(tmp_path / "r0.safetensors", rank=0)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", lora))
    assert line.endswith("has rank 0 (shape (0, 64)): an empty LoRA")
    assert "lora_A" in line and str(lora) in line


@pytest.mark.parametrize("value,alpha", [(float("nan"), None), (0.1, float("inf"))])
def test_lora_file_with_nan_names_the_file_and_tensor(tiny, tmp_path, capsys, value, alpha):
    lora = _lora(tmp_path / "bad.safetensors", rank=2, value=value, alpha=alpha)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", lora))
    assert line.startswith(f"zimage-lite: error: {lora}: tensor ") and line.endswith("holds NaN or infinity")


NOT_A_NUMBER = "the scale {!r} is not a number (FILE:0.8)"
NOT_FINITE = "the scale must be a finite number (got {})"


@pytest.mark.parametrize(
    "scale,says",
    [("abc", NOT_A_NUMBER), ("1,5", NOT_A_NUMBER), ("", NOT_A_NUMBER), ("nan", NOT_FINITE),
     ("inf", NOT_FINITE), ("-inf", NOT_FINITE)],
)  # fmt: skip
def test_lora_scale_that_is_not_a_finite_number(tiny, tmp_path, capsys, scale, says):
    lora = _lora(tmp_path / "ok.safetensors", rank=2)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", f"{lora}:{scale}"))
    assert line == f"zimage-lite: error: --lora {lora}:{scale}: " + says.format(scale)


def test_lora_api_refuses_a_non_finite_scale(tiny):
    from zimage_lite.errors import UsageError
    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(tiny, device="cpu")
    with pytest.raises(UsageError, match="finite"):
        pipe.load_lora("whatever.safetensors", float("nan"))
    assert pipe.loras == []


def test_missing_lora_file_still_says_so(tiny, tmp_path, capsys):
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", tmp_path / "nothere.safetensors:0.5"))
    assert line == f"zimage-lite: error: {tmp_path / 'nothere.safetensors'}: no such LoRA file"


@pytest.fixture(scope="module")
def gguf_file(tiny, tmp_path_factory):
    from zimage_lite.convert.converter import convert

    out = tmp_path_factory.mktemp("gguf") / "t.gguf"
    convert(tiny / "transformer", out, "q8_0", progress=False)
    return out


@pytest.mark.parametrize("keep", [8, 24, 40, 100, 1000, 5000, 0.5])
def test_truncated_gguf_says_truncated(gguf_file, tmp_path, capsys, keep):
    data = gguf_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if keep < 1 else keep])
    line = error_line(capsys, "inspect", cut)
    assert line.startswith(f"zimage-lite: error: {cut}: truncated GGUF file"), line


# -- outputs: one rule for every command -----------------------------------------------------------------
def test_output_same_as_stats_is_refused(tiny, tmp_path, capsys):
    same = tmp_path / "same.png"
    line = error_line(capsys, *gen(tiny, same, "--stats", same))
    assert line == f"zimage-lite: error: {same}: --stats and -o name the same file: give each its own"
    assert not same.exists()


def test_batch_file_and_stats_collision_is_refused(tiny, tmp_path, capsys):
    line = error_line(capsys, *gen(tiny, tmp_path / "b.png", "--batch", 2, "--stats", tmp_path / "b-1.png"))
    assert "--stats and -o (image 1) name the same file" in line


@pytest.mark.parametrize("option", ["--init-image", "--mask"])
def test_output_onto_an_input_is_refused_even_with_force(tiny, tmp_path, capsys, option):
    photo = tmp_path / "photo.png"
    assert main([str(a) for a in gen(tiny, photo)]) == 0
    before = photo.read_bytes()
    other = tmp_path / "other.png"
    other.write_bytes(before)
    extra = [option, photo] if option == "--init-image" else ["--init-image", other, "--mask", photo]
    line = error_line(capsys, *gen(tiny, photo, *extra, "--force"))
    assert line == f"zimage-lite: error: {photo}: -o would overwrite the {option} it reads: write elsewhere"
    assert photo.read_bytes() == before


def test_output_onto_a_model_file_is_refused(tiny, tmp_path, capsys):
    target = tiny / "model_index.json.png"  # any existing file inside the model folder is an input
    target.write_bytes(b"x")
    try:
        line = error_line(capsys, *gen(tiny, target, "--force"))
    finally:
        target.unlink()
    assert "would overwrite the --model it reads" in line


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "a.png"
    out.write_bytes(b"mine")
    line = error_line(capsys, *gen(tiny, out))
    assert line == f"zimage-lite: error: {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"mine"
    assert main([str(a) for a in gen(tiny, out, "--force")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_follow_the_umask(tiny, tmp_path, capsys):
    out, stats = tmp_path / "a.png", tmp_path / "a.json"
    out.write_bytes(b"old")
    out.chmod(0o600)
    old = os.umask(0o022)
    try:
        assert main([str(a) for a in gen(tiny, out, "--stats", stats, "--force")]) == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777, stats.stat().st_mode & 0o777) == (0o644, 0o644)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "name,fmt", [("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP"), ("a.png", "PNG")]
)
def test_image_type_follows_the_extension_with_metadata(tiny, tmp_path, capsys, name, fmt):
    from PIL import Image

    from zimage_lite.outputs import read_metadata

    out = tmp_path / name
    argv = gen(tiny, out)
    argv[1] = "一只猫, a cat"
    assert main([str(a) for a in argv]) == 0
    with Image.open(out) as img:
        assert img.format == fmt and img.size == (32, 32)
    meta = read_metadata(out)
    assert meta["prompt"] == "一只猫, a cat" and meta["seed"] == "0" and meta["batch_index"] == "0"


@pytest.mark.parametrize("name", ["a.gif", "a.tiff", "a"])
def test_unknown_image_type_is_refused_up_front(tiny, tmp_path, capsys, monkeypatch, name):
    from zimage_lite.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded before refusing"))
    line = error_line(capsys, *gen(tiny, tmp_path / name))
    assert line.endswith("is not an image type zimage-lite writes: use .png, .jpg or .webp")
    assert not list(tmp_path.iterdir())


# -- batches: each image records what remakes it ---------------------------------------------------------
def test_batch_image_remade_alone_equals_the_batch_image(tiny, tmp_path, capsys):
    from zimage_lite.outputs import read_metadata

    assert main([str(a) for a in gen(tiny, tmp_path / "b.png", "--batch", 3, "--seed", 7)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0.png", "b-1.png", "b-2.png"]
    meta = read_metadata(tmp_path / "b-1.png")
    assert (meta["seed"], meta["batch"], meta["batch_index"]) == ("7", "3", "1")
    remake = ["--seed", meta["seed"], "--batch", meta["batch"], "--batch-index", meta["batch_index"]]
    assert main([str(a) for a in gen(tiny, tmp_path / "one.png", *remake)]) == 0
    import numpy as np
    from PIL import Image

    batch, alone = (np.asarray(Image.open(tmp_path / n)) for n in ("b-1.png", "one.png"))
    other = np.asarray(Image.open(tmp_path / "b-0.png"))
    # CPU float32: one row run alone and the same row in a batch of 3 take the same kernels here
    assert np.array_equal(batch, alone) and not np.array_equal(batch, other)
    assert read_metadata(tmp_path / "one.png")["batch_index"] == "1"


def test_batch_index_api_keeps_that_row_of_the_batch_noise(tiny):
    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(tiny, device="cpu")
    kw = dict(seed=3, steps=2, width=32, height=32)
    full = pipe.generate_latents("a", batch=3, **kw)
    one = pipe.generate_latents("a", batch=3, batch_index=2, **kw)
    assert one.shape[0] == 1
    torch.testing.assert_close(one[0], full[2], rtol=1e-5, atol=1e-5)
    seed_plus = pipe.generate_latents("a", batch=1, **{**kw, "seed": 5})
    assert not torch.allclose(seed_plus[0], full[2])  # image 2 is not seed + 2


def test_batch_index_outside_the_batch(tiny, tmp_path, capsys):
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--batch", 2, "--batch-index", 2))
    assert line == "zimage-lite: error: --batch-index 2 is not in a batch of 2 (0 to 1)"


# -- the API agrees with the program ---------------------------------------------------------------------
def test_api_refuses_the_seeds_the_cli_refuses(tiny):
    from zimage_lite.errors import UsageError
    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(tiny, device="cpu")
    for seed in (-1, 2**64):
        with pytest.raises(UsageError, match="seed must be from 0 to 18446744073709551615"):
            pipe.generate("a", seed=seed, steps=1, width=16, height=16)


def test_api_cuda_without_cuda_does_not_speak_of_options(tiny, monkeypatch):
    from zimage_lite.errors import UsageError
    from zimage_lite.pipeline import Pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as err:
        Pipeline.load(tiny, device="cuda")
    assert "--" not in str(err.value) and "no usable CUDA device" in str(err.value)


def test_hires_fix_returns_a_list_as_generate_does(tiny):
    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(tiny, device="cpu")
    first = pipe.generate("a", steps=2, width=32, height=32)
    hires = pipe.hires_fix(first[0], "a", scale=1.5, strength=0.5, steps=2)
    assert isinstance(hires, list) and len(hires) == 1 and hires[0].size == (48, 48)


def test_inpainting_records_the_strength_it_used(tiny, tmp_path, capsys):
    from zimage_lite.outputs import read_metadata

    photo, out = tmp_path / "photo.png", tmp_path / "in.png"
    assert main([str(a) for a in gen(tiny, photo)]) == 0
    assert main([str(a) for a in gen(tiny, out, "--init-image", photo, "--mask", photo)]) == 0
    assert read_metadata(out)["strength"] == "1"
    assert main([str(a) for a in gen(tiny, tmp_path / "i2i.png", "--init-image", photo)]) == 0
    assert read_metadata(tmp_path / "i2i.png")["strength"] == "0.6"


def test_stats_show_no_budget_as_null(tiny, tmp_path, capsys):
    import json

    stats = tmp_path / "s.json"
    assert main([str(a) for a in gen(tiny, tmp_path / "a.png", "--stats", stats)]) == 0
    plans = json.loads(stats.read_text())["streaming"]["plans"]
    budgets = [p["budget_bytes"] for p in plans.values() if isinstance(p, dict) and "budget_bytes" in p]
    assert budgets and all(b is None for b in budgets), budgets


def test_tiny_init_image_without_a_size_is_refused(tiny, tmp_path, capsys):
    from PIL import Image

    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    line = error_line(capsys, *[a for a in gen(tiny, tmp_path / "a.png", "--init-image", dot)
                                if a not in ("--width", "--height", 32)])  # fmt: skip
    assert line == (
        f"zimage-lite: error: {dot}: the init image is 1x1, below the 16-pixel minimum side of an output: "
        "give --width and --height"
    )


# -- the same kinds of fault, found elsewhere ----------------------------------------------------------
def test_init_image_that_is_a_fifo_is_refused_not_waited_on(tiny, tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    argv = [str(a) for a in gen(tiny, tmp_path / "a.png", "--init-image", fifo)]
    code = f"import sys\nfrom zimage_lite.cli import main\nsys.exit(main({argv!r}))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"zimage-lite: error: {fifo} is a FIFO, not an init image file\n"


def test_lora_that_is_a_fifo(tiny, tmp_path, capsys):
    fifo = tmp_path / "style.safetensors"
    os.mkfifo(fifo)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", fifo))
    assert line == f"zimage-lite: error: {fifo} is a FIFO, not a LoRA file"


def test_init_image_too_large_to_decode(tiny, tmp_path, capsys):
    import struct
    import zlib

    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (1, 1)).save(bomb)
    data = bomb.read_bytes()
    header = b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # declares 30000x30000
    bomb.write_bytes(
        data[:8] + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)) + data[33:]
    )
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--init-image", bomb))
    assert line.startswith(
        f"zimage-lite: error: {bomb}: cannot read the init image (Image size (900000000 pixels)"
    )


def test_model_folder_whose_name_is_not_utf8(tiny, tmp_path, capsys):
    import shutil

    from zimage_lite.outputs import read_metadata

    model = tmp_path / os.fsdecode(b"m\xff")
    shutil.copytree(tiny, model)
    for name in ("a.png", "a.jpg"):
        assert main([str(a) for a in gen(model, tmp_path / name)]) == 0, capsys.readouterr().err
        assert read_metadata(tmp_path / name)["model.transformer"] == str(
            tmp_path / "m\ufffd" / "transformer"
        )


def test_force_never_replaces_a_fifo_or_device(tiny, tmp_path, capsys):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    for argv in (
        gen(tiny, tmp_path / "a.png", "--stats", fifo, "--force"),
        ["convert", tiny / "transformer", "-o", fifo, "--quant", "q8_0", "--force", "-q"],
    ):
        line = error_line(capsys, *argv)
        assert line == f"zimage-lite: error: {fifo} is a device, FIFO or socket, not a file: write elsewhere"
        assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.gguf"]


@pytest.mark.parametrize("command", ["synthetic", "convert"])
def test_force_never_replaces_a_folder_of_other_files(tiny, tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = (
        ["synthetic", mine]
        if command == "synthetic"
        else ["convert", tiny, "-o", mine, "--quant", "q8_0", "-q"]
    )
    line = error_line(capsys, *argv, "--force")
    assert line == f"zimage-lite: error: {mine} holds files that are not an earlier output: give a new folder"
    assert (mine / "notes.txt").read_text() == "keep" and len(list(tmp_path.iterdir())) == 1
    again = (
        ["synthetic", tmp_path / "new"]
        if command == "synthetic"
        else [*argv[:3], tmp_path / "new", *argv[4:]]
    )
    assert main([str(a) for a in again]) == 0
    assert main([str(a) for a in [*again, "--force"]]) == 0  # an earlier output of the command is replaced
