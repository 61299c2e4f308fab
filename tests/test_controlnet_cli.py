"""`generate --controlnet ... --control ...`: the CLI's ControlNet options, their errors, and canny."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from controlnet_fixtures import build, write_diffusers
from PIL import Image
from test_img2img import picture

from zimage_lite.cli import main
from zimage_lite.cli_control import canny
from zimage_lite.errors import UsageError
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny = write_synthetic_model(root / "tiny", "tiny", seed=0)
    cn = write_diffusers(root / "cn", build(None, 16, [0, 1], None, n_refiner=1, seed=1))
    picture(48, 32, 2).save(root / "photo.png")
    return tiny, cn, root


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_generate_with_canny_control_writes_the_png(setup, tmp_path, capsys):
    tiny, cn, root = setup
    out = tmp_path / "c.png"
    base = ["generate", "a barn", "--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--width", "48",
            "--height", "32", "--steps", "2", "-q"]  # fmt: skip
    code, _ = _run([*base, "-o", str(out), "--controlnet", str(cn), "--control", str(root / "photo.png"),
                    "--control-preprocess", "canny", "--control-scale", "1.0"], capsys)  # fmt: skip
    assert code == 0
    with Image.open(out) as im:
        assert im.size == (48, 32)
        assert im.text["control_preprocess"] == "canny" and im.text["control_scale"] == "1"
        controlled = np.asarray(im)
    code, err = _run([*base, "-o", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    assert not np.array_equal(controlled, np.asarray(Image.open(tmp_path / "p.png")))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--control", "X"], "--control needs --controlnet"),
        (["--control-mask", "X"], "need --control IMAGE"),
        (
            ["--controlnet", "CN", "--control", "X", "--control-start", "0.8", "--control-end", "0.2"],
            "must be below --control-end",
        ),
        (["--control-scale", "-1"], "argument --control-scale: must be between 0 and 4"),
    ],
)
def test_control_option_errors_are_one_line(setup, tmp_path, capsys, extra, message):
    tiny, cn, _ = setup
    extra = [str(cn) if a == "CN" else a for a in extra]
    code, err = _run(["generate", "x", "--model", str(tiny), "--device", "cpu", "-o", str(tmp_path / "a.png"),
                      *extra], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "a.png").exists()


def test_canny_draws_the_edges_and_needs_opencv(monkeypatch):
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    edges = np.asarray(canny(Image.fromarray(square), 32, 32))
    assert edges.shape == (32, 32, 3) and edges[16, 7:9].max() == 255 and edges[16, 16].max() == 0
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(UsageError, match=r"needs OpenCV: pip install 'zimage-lite\[control\]'"):
        canny(Image.fromarray(square), 32, 32)


def test_control_joins_img2img_and_the_hires_pass(setup, tmp_path, capsys):
    tiny, cn, root = setup
    base = ["generate", "a barn", "--model", str(tiny), "--device", "cpu", "--dtype", "float32", "--steps", "2",
            "-q", "--init-image", str(root / "photo.png"), "--hires", "1.5"]  # fmt: skip
    code, err = _run([*base, "-o", str(tmp_path / "c.png"), "--controlnet", str(cn), "--control",
                      str(root / "photo.png")], capsys)  # fmt: skip
    assert code == 0, err
    code, err = _run([*base, "-o", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "c.png") as c, Image.open(tmp_path / "p.png") as p:
        assert c.size == p.size == (64, 48)  # the init image's 48x32, then the hires pass at 1.5x
        assert not np.array_equal(np.asarray(c), np.asarray(p))
