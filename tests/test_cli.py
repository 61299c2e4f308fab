"""The `zimage-lite` command line: outputs, metadata, stats, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from zimage_lite.cli import main
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("cli") / "tiny", "tiny", seed=0)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_metadata_and_stats(tiny, tmp_path, capsys):
    out = tmp_path / "img.png"
    stats = tmp_path / "stats.json"
    code, _, _ = run(
        capsys, "generate", "一只猫 and a dog", "--model", str(tiny), "--width", "64", "--height", "48",
        "--steps", "3", "--seed", "11", "-o", str(out), "--stats", str(stats), "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    img = Image.open(out)
    assert img.size == (64, 48)
    assert img.text["prompt"] == "一只猫 and a dog"
    assert img.text["seed"] == "11" and img.text["steps"] == "3" and img.text["size"] == "64x48"
    assert img.text["model.transformer"].endswith("transformer")
    data = json.loads(stats.read_text())
    assert len(data["steps_s"]) == 3 and all(s > 0 for s in data["steps_s"])
    assert set(data["phases_s"]) == {"text_encoder", "denoise", "vae"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_batch_writes_numbered_files(tiny, tmp_path, capsys):
    code, _, _ = run(
        capsys, "generate", "boats", "--model", str(tiny), "--width", "32", "--height", "32", "--steps", "2",
        "--batch", "2", "-o", str(tmp_path / "b.png"),
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0.png", "b-1.png"]


def _one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_size_not_multiple_of_16(tiny, tmp_path, capsys):
    code, _, err = run(
        capsys, "generate", "x", "--model", str(tiny), "--width", "50", "-o", str(tmp_path / "a.png")
    )
    _one_line_error(code, err, "argument --width: must be a multiple of 16 from 16 to 8192")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_missing(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model", str(tiny), "-o", str(tmp_path / "nope" / "a.png"))
    _one_line_error(code, err, "output folder does not exist")


def test_missing_component_folder(tiny, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "vae")
    code, _, err = run(capsys, "generate", "x", "--model", str(broken), "-o", str(tmp_path / "a.png"))
    _one_line_error(code, err, "vae not found")


def test_missing_and_unexpected_tensor_named(tiny, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny, broken)
    shard = next((broken / "transformer").glob("*.safetensors"))
    tensors = load_file(shard)
    victim = next(k for k in tensors if k.endswith("feed_forward.w2.weight"))
    tensors.pop(victim)
    tensors["layers.0.surprise.weight"] = torch.zeros(3)
    save_file(tensors, shard)
    index = next((broken / "transformer").glob("*.index.json"))
    meta = json.loads(index.read_text())
    meta["weight_map"].pop(victim)
    index.write_text(json.dumps(meta))
    code, _, err = run(capsys, "generate", "x", "--model", str(broken), "-o", str(tmp_path / "a.png"))
    _one_line_error(code, err, f"missing tensors: {victim}")
    assert "unexpected tensors: layers.0.surprise.weight" in err
    assert not (tmp_path / "a.png").exists()


def test_wrong_shape_named(tiny, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny, broken)
    shard = next((broken / "vae").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"][:2].clone()
    save_file(tensors, shard)
    code, _, err = run(capsys, "generate", "x", "--model", str(broken), "-o", str(tmp_path / "a.png"))
    _one_line_error(code, err, "wrong shapes: decoder.conv_out.bias (2,) (expected (3,))")


def test_truncated_checkpoint(tiny, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny, broken)
    shard = next((broken / "vae").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run(capsys, "generate", "x", "--model", str(broken), "-o", str(tmp_path / "a.png"))
    _one_line_error(code, err, "truncated")


def test_cuda_without_cuda(tiny, tmp_path, capsys):

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(
        capsys, "generate", "x", "--model", str(tiny), "--device", "cuda", "-o", str(tmp_path / "a.png")
    )
    _one_line_error(code, err, "no usable CUDA device")


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "zimage_lite.cli", "generate", "x", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such model folder" in proc.stderr


def test_bad_argument_is_one_line(capsys):
    assert main(["generate", "x", "--steps", "many"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
