"""Issue 19, signals and resources: Ctrl-C and full disks report what is really kept, up-front checks
before `synthetic --size full`, the bench's report folder and cache, a closed stdout pipe; and the
messages that misled (inspect on a device or FIFO, --model on a file, --tokenizer, --vram, the VAE)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_inputs import error_line, gen  # tests/ is on sys.path (pytest rootdir conftest)

from zimage_lite import preflight
from zimage_lite.bench import sources
from zimage_lite.cli import main
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("signals") / "tiny", "tiny", seed=0)


def _sigint(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to this (main) thread


# -- Ctrl-C and faults after some outputs were complete ---------------------------------------------------
def test_ctrl_c_right_after_convert_wrote_its_output_says_it_is_kept(tiny, tmp_path, capsys, monkeypatch):
    from zimage_lite.convert import converter

    out = tmp_path / "t.gguf"
    monkeypatch.setattr(converter.log, "info", _sigint)  # the log line right after the rename
    line = error_line(
        capsys, "convert", tiny / "transformer", "-o", out, "--quant", "q8_0", "-q", exit_code=130
    )
    assert line == f"zimage-lite: error: interrupted; what was complete before is kept: {out}; nothing else"
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["t.gguf"]


def test_disk_full_on_the_second_image_of_a_batch_names_the_first(tiny, tmp_path, capsys, monkeypatch):
    from zimage_lite import outputs

    real = outputs.save_image
    calls = []

    def second_fails(image, path, meta, target=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(image, path, meta, target)

    monkeypatch.setattr(outputs, "save_image", second_fails)
    line = error_line(capsys, *gen(tiny, tmp_path / "b.png", "--batch", 2))
    assert line.startswith("zimage-lite: error: disk full while writing ")
    assert line.endswith(f"what was complete before is kept: {tmp_path / 'b-0.png'}; nothing else")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0.png"]


# -- synthetic: checked up front, a full disk is our line, nothing left -----------------------------------
def test_synthetic_full_checks_disk_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 10 * 2**30)
    line = error_line(capsys, "synthetic", tmp_path / "full", "--size", "full")
    assert line.startswith(
        f"zimage-lite: error: not enough disk space for {tmp_path / 'full'}: it needs about 3"
    )
    assert list(tmp_path.iterdir()) == []


def test_synthetic_full_checks_memory_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 2 * 2**30)
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 2**40)  # whatever this disk has free
    line = error_line(capsys, "synthetic", tmp_path / "full", "--size", "full")
    assert line.startswith(
        "zimage-lite: error: not enough host memory: writing the full synthetic model needs"
    )
    assert list(tmp_path.iterdir()) == []


def test_synthetic_full_fits_in_a_24gb_machine():
    """The shards are written as they fill: one 2 GiB shard and the largest tensor, not the 24 GB transformer."""
    import torch

    from zimage_lite.synthetic import planned_bytes

    disk, host = planned_bytes("full", torch.float32)
    assert 30e9 < disk < 36e9  # 6.15 B float32 transformer + 4 B bf16 text encoder + the VAE
    assert host < 6e9


def test_disk_full_during_synthetic_is_our_line(tmp_path):
    """A real write error, no root needed: RLIMIT_FSIZE makes the kernel refuse a write past 200 kB (EFBIG,
    a disk-full error for us) inside safetensors' own writer."""
    out = tmp_path / "model"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from zimage_lite.cli import main\n"
        f"sys.exit(main(['synthetic', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("zimage-lite: error: disk full while writing ") and "nothing was kept" in lines[0]
    )
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_leaves_a_part_the_next_run_removes(tmp_path, capsys):
    stale = tmp_path / ".model.part-999999999"  # no such process
    (stale / "transformer").mkdir(parents=True)
    assert main(["synthetic", str(tmp_path / "model")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# -- bench -----------------------------------------------------------------------------------------------
def _bench_args(tmp_path: Path, *extra) -> list:
    size = ["--width", 32, "--height", 32, "--steps", 1, "--prompts", 1, "--warmup", 0, "--no-images"]
    return ["bench", "--synthetic", "tiny", "--device", "cpu", *size, "-q", *extra]


def test_interrupted_bench_leaves_nothing(tmp_path, capsys, monkeypatch):
    from zimage_lite.bench.engines import OursEngine

    calls = []
    real = OursEngine.generate

    def interrupt_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _sigint()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(OursEngine, "generate", interrupt_second)
    out = tmp_path / "report"
    args = _bench_args(tmp_path, "--precisions", "bf16,q8_0", "--cache", tmp_path / "cache", "--out", out)
    args.remove("--no-images")  # images are written during the run: they must go too
    line = error_line(capsys, *args, exit_code=130)
    assert line.startswith("zimage-lite: error: interrupted;")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_bench_with_a_home_it_cannot_write_names_cache(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "home-file"
    blocker.write_text("")  # a cache "folder" under a file cannot be made, whoever runs the test
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    out = tmp_path / "report"
    line = error_line(capsys, *_bench_args(tmp_path, "--out", out))
    assert line.startswith(
        f"zimage-lite: error: cannot create the cache folder {blocker / 'zimage-lite' / 'bench'}"
    )
    assert line.endswith(": give a writable one with --cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home-file"]  # no empty report folder


def test_default_cache_follows_xdg_and_the_suite_never_uses_the_real_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path / "zimage-lite" / "bench"
    monkeypatch.undo()
    real = Path.home() / ".cache"
    assert not sources.default_cache_dir().resolve().is_relative_to(real.resolve())  # conftest's tmp


def test_bench_out_holding_other_files_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    line = error_line(capsys, *_bench_args(tmp_path, "--cache", tmp_path / "c", "--out", out, "--force"))
    assert (
        line
        == f"zimage-lite: error: {out} holds files that are not a bench report (notes.txt): give --out a new folder"
    )
    assert (out / "notes.txt").read_text() == "keep"


def test_bench_out_same_as_cache_is_refused(tmp_path, capsys):
    same = tmp_path / "x"
    line = error_line(capsys, *_bench_args(tmp_path, "--cache", same, "--out", same))
    assert "--cache and --out name the same file" in line


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """bf16 and q8_0, 3 rounds; the order the rows ran in, and the report."""
    import json

    from zimage_lite.bench.engines import OursEngine

    root = tmp_path_factory.mktemp("interleave")
    order = []
    real = OursEngine.generate

    def record(self, *args, **kwargs):
        order.append(str(self.pipe.paths.transformer))
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OursEngine, "generate", record)
        argv = _bench_args(
            root, "--precisions", "bf16,q8_0", "--repeats", 3, "--cache", root / "c", "--out", root / "r"
        )
        assert main([str(a) for a in argv]) == 0
    return order, json.loads((root / "r" / "report.json").read_text()), root / "r"


def test_bench_rows_repeats_are_interleaved(interleaved):
    order, _, _ = interleaved
    rows = ["q8_0" if "q8_0" in p else "bf16" for p in order]
    assert rows == ["bf16", "q8_0"] * 3


def test_bench_report_has_spread_and_load(interleaved):
    from zimage_lite.bench.schema import validate_report

    _, report, out = interleaved
    assert validate_report(report) == []
    for row in report["rows"]:
        t = row["timing"]
        assert t["samples"] == 3
        assert t["s_per_image_min"] <= t["s_per_image_median"] <= t["s_per_image_max"]
        assert t["spread"] == pytest.approx(
            (t["s_per_image_max"] - t["s_per_image_min"]) / t["s_per_image_median"]
        )
        assert t["comparable"] == (t["spread"] <= 0.3)
    env = report["environment"]
    assert len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3
    text = (out / "report.md").read_text()
    assert "load average (1/5/15 min)" in text and "s/image (min–max)" in text


def test_a_row_whose_repeats_spread_too_wide_is_marked(interleaved):
    import copy

    from zimage_lite.bench.markdown import render_markdown
    from zimage_lite.bench.report import spread

    assert spread({"short s0": [0.2, 0.21, 0.2]}) == pytest.approx(0.05)
    assert spread({"short s0": [0.038, 2.0]}) == pytest.approx((2.0 - 0.038) / 1.019)
    assert spread({"short s0": [1.0]}) is None
    _, report, _ = interleaved
    busy = copy.deepcopy(report)
    for row in busy["rows"]:  # report.json writes infinity as "inf"; render_markdown takes the numbers
        row["quality"] = {k: float(v) if v == "inf" else v for k, v in row["quality"].items()}
    busy["rows"][1]["timing"].update(spread=1.5, comparable=False)
    line = next(
        li for li in render_markdown(busy).splitlines() if li.startswith(f"| **{busy['rows'][1]['name']}**")
    )
    assert "**not comparable** (spread 150%)" in line


def test_plot_legend_only_for_rows_that_exist(interleaved):
    from zimage_lite.bench import draw

    _, report, _ = interleaved
    ours = draw.quality_time_plot(report["rows"])
    with_diffusers = [*report["rows"], {**report["rows"][0], "name": "diffusers-bf16", "kind": "diffusers"}]
    both = draw.quality_time_plot(with_diffusers)
    legend = (ours.width - 160, 10, ours.width - 40, 30)  # where the second legend entry goes
    assert ours.crop(legend).getcolors() == [(120 * 20, ours.getpixel((0, 0)))]  # background only
    assert len(both.crop(legend).getcolors()) > 1


# -- a closed stdout -------------------------------------------------------------------------------------
def test_inspect_into_a_closed_pipe_exits_quietly(tiny):
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_lite.cli", "inspect", "--json", str(tiny)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # the reader left before the first byte (`| head -c 0`)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == b""


# -- messages --------------------------------------------------------------------------------------------
def test_inspect_a_device_or_fifo(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert error_line(capsys, "inspect", fifo) == (
        f"zimage-lite: error: {fifo} is a FIFO, not a file or folder"
    )
    assert error_line(capsys, "inspect", "/dev/null") == (
        "zimage-lite: error: /dev/null is a device, not a file or folder"
    )
    assert (
        error_line(capsys, "inspect", tmp_path / "nothere")
        == f"zimage-lite: error: {tmp_path / 'nothere'}: no such file or folder"
    )


def test_model_that_is_a_file(tiny, tmp_path, capsys):
    shard = next((tiny / "vae").glob("*.safetensors"))
    line = error_line(capsys, "generate", "x", "--model", shard, "-o", tmp_path / "a.png")
    assert line == (
        f"zimage-lite: error: {shard} is a file, not a model folder: give single files with --transformer, "
        "--text-encoder and --vae"
    )


def test_convert_tokenizer_that_is_not_there(tiny, tmp_path, capsys):
    nothere = tmp_path / "nothere"
    argv = ["convert", tiny / "text_encoder", "-o", tmp_path / "te.gguf", "--quant", "q8_0", "-q"]
    assert error_line(capsys, *argv, "--tokenizer", nothere) == (
        f"zimage-lite: error: {nothere}: no such tokenizer folder (--tokenizer)"
    )
    assert error_line(capsys, *argv, "--tokenizer", tmp_path) == (
        f"zimage-lite: error: {tmp_path}: no tokenizer.json in this folder (--tokenizer)"
    )
    line = error_line(
        capsys, "convert", tiny, "-o", tmp_path / "m", "--quant", "q8_0", "--tokenizer", tiny / "tokenizer"
    )
    assert line.endswith("--tokenizer is for a lone text encoder: a model folder's own tokenizer/ is used")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1GB", "-4", "0", "lots"])
def test_bad_vram_says_what_is_wrong(tiny, tmp_path, capsys, value):
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--vram", value))
    assert line.startswith(f"zimage-lite generate: error: argument --vram: '{value}': ")
    assert "expected one argument" not in line


def test_vae_minimum_names_the_untileable_part(tiny, tmp_path, capsys):
    line = error_line(
        capsys, *gen(tiny, tmp_path / "a.png", "--vram", "1GB", "--width", 2048, "--height", 2048)
    )
    assert "tiles of" not in line
    assert line.endswith(
        "for the VAE decode at 2048x2048 batch 1: its mid-block attention runs over all 65536 latent positions "
        "at once, which tiles do not shrink: use a smaller --width/--height"
    )


def test_path_with_a_nul_byte(capsys):
    assert error_line(capsys, "inspect", "a\x00b") == "zimage-lite: error: a\\x00b: no such file or folder"


def test_card_auto_is_refused_when_parsed(tiny, tmp_path, capsys):
    line = error_line(capsys, *gen(tiny, tmp_path / "a.png", "--card", "auto"))
    assert (
        line
        == "zimage-lite generate: error: argument --card: a card has a size, e.g. 4GB, 6GB or 8GB (got 'auto')"
    )
