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


@pytest.mark.parametrize("scale", ["abc", "1,5", ""])
def test_lora_scale_that_is_not_a_number(tiny, tmp_path, capsys, scale):
    lora = _lora(tmp_path / "ok.safetensors", rank=2)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", f"{lora}:{scale}"))
    assert (
        line == f"zimage-lite: error: --lora {lora}:{scale}: the scale {scale!r} is not a number (FILE:0.8)"
    )


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_lora_scale_that_is_not_finite(tiny, tmp_path, capsys, scale):
    lora = _lora(tmp_path / "ok.safetensors", rank=2)
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--lora", f"{lora}:{scale}"))
    assert (
        line == f"zimage-lite: error: --lora {lora}:{scale}: the scale must be a finite number (got {scale})"
    )


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
