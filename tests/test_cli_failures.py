"""Failures a user or the machine causes: each ends with one line on stderr, exit 2 (130 for Ctrl-C), and
nothing left behind. Machine faults (full disk, no memory, CUDA out of memory, an interrupt) are
simulated where they happen: the writer, the sampler, the VAE decode, the free-memory probes."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from zimage_lite import cli_args, preflight
from zimage_lite.cli import main
from zimage_lite.runtime.budget import GIB, MIB
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.gguf_writer import GGUFStreamWriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("failures") / "tiny", "tiny", seed=0)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(code: int, err: str, pattern: str, exit_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert pattern in lines[0], lines[0]
    return lines[0]


def gen(tiny, out: Path, *extra) -> list:
    return [
        "generate",
        "x",
        "--model",
        tiny,
        "--width",
        32,
        "--height",
        32,
        "--steps",
        1,
        "-q",
        "-o",
        out,
        *extra,
    ]


# -- the five cases of issue 14 -------------------------------------------------------------------------
def test_huge_size_refused_when_parsed(tiny, tmp_path, capsys):
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"), "--width", 160000, "--height", 160000)
    one_line(code, err, "argument --width: must be a multiple of 16 from 16 to 8192")
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_folder(tiny, tmp_path, capsys):
    code, err = run(capsys, *gen(tiny, tmp_path))
    one_line(code, err, "is a folder: give a file name")


def test_seed_beyond_torch(tiny, tmp_path, capsys):
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"), "--seed", 99999999999999999999)
    one_line(code, err, "argument --seed: must be from 0 to 18446744073709551615")


def test_convert_onto_a_full_disk_refused_up_front(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 600 * 1024)
    code, err = run(capsys, "convert", tiny, "-o", tmp_path / "out", "--quant", "q8_0", "-q")
    line = one_line(code, err, "not enough disk space for")
    assert "600 KB is free there" in line
    assert list(tmp_path.iterdir()) == []


def test_bench_out_is_an_existing_file(tmp_path, capsys):
    existing = tmp_path / "report"
    existing.write_text("mine")
    code, err = run(capsys, "bench", "--synthetic", "tiny", "--out", existing, "--cache", tmp_path / "c")
    one_line(code, err, "argument --out:")
    assert existing.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# -- the disk fills, or the user presses Ctrl-C, while writing ----------------------------------------
@pytest.mark.parametrize(
    "fault, pattern, exit_code",
    [
        (OSError(errno.ENOSPC, "No space left on device", "t.gguf"), "disk full while writing t.gguf", 2),
        (OSError("131072 requested and 72480 written"), "disk full while writing", 2),  # numpy's tofile
        (KeyboardInterrupt(), "interrupted; nothing was kept", 130),
    ],
)
def test_fault_while_converting_leaves_nothing(
    tiny, tmp_path, capsys, monkeypatch, fault, pattern, exit_code
):
    def write(self, name, data):
        raise fault

    monkeypatch.setattr(GGUFStreamWriter, "write", write)
    code, err = run(capsys, "convert", tiny, "-o", tmp_path / "out", "--quant", "q8_0", "-q")
    one_line(code, err, pattern, exit_code)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_converting_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    def write(self, name, data):
        os.kill(os.getpid(), signal.SIGTERM)  # `kill PID`, delivered to this (main) thread
        time.sleep(5)  # the handler raises before this ends

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(GGUFStreamWriter, "write", write)
    code, err = run(capsys, "convert", tiny, "-o", tmp_path / "out", "--quant", "q8_0", "-q")
    one_line(code, err, "terminated; nothing was kept", 143)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous  # main() put the handler back


def test_disk_estimate_covers_the_real_output(tiny, tmp_path, monkeypatch):
    from zimage_lite.convert import converter

    needs = []
    monkeypatch.setattr(converter, "check_disk", lambda out, need: needs.append(need))
    for quant in ("q4_k", "fp8", "bf16"):
        out = tmp_path / quant
        converter.convert(tiny, out, quant, progress=False)
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        assert written <= needs[-1] <= 1.25 * written, (quant, written, needs[-1])


# -- memory: refused up front, or translated when it runs out anyway -------------------------------------
def test_not_enough_host_memory_to_load(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 1 * MIB)
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"))
    one_line(code, err, "not enough host memory: loading the model needs about")
    assert list(tmp_path.iterdir()) == []


def test_huge_image_refused_with_numbers(tiny, tmp_path, capsys):
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"), "--width", 8192, "--height", 8192)
    line = one_line(code, err, "not enough host memory: generating 1 image(s) of 8192x8192 needs about")
    assert re.search(r"needs about [\d.]+ [GT]B, [\d.]+ [GM]B is available", line), line
    assert list(tmp_path.iterdir()) == []


def _raiser(name: str, exc: BaseException):
    """A stand-in named like the pipeline function it replaces (the phase is read from the traceback)."""

    def stand_in(*args, **kwargs):
        raise exc

    stand_in.__code__ = stand_in.__code__.replace(co_name=name)
    return stand_in


@pytest.mark.parametrize(
    "target, name, phase",
    [("zimage_lite.pipeline.Pipeline.encode_ids", "encode_ids", "text encoder"),
     ("zimage_lite.pipeline.euler_sample", "euler_sample", "transformer"),
     ("zimage_lite.pipeline.euler_sample", "unnamed", "transformer"),  # from the runtime's phase context
     ("zimage_lite.runtime.vae_tiling.decode_to_uint8_tiled", "decode_to_uint8_tiled", "VAE decode")],
)  # fmt: skip
def test_device_oom_names_phase_and_a_vram_that_plans(
    tiny, tmp_path, capsys, monkeypatch, target, name, phase
):
    with monkeypatch.context() as patch:
        patch.setattr(target, _raiser(name, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
        code, err = run(capsys, *gen(tiny, tmp_path / "a.png"))
    line = one_line(code, err, f"out of device memory in phase {phase}: try --vram ")
    vram = re.search(r"--vram (\S+)$", line).group(1)
    assert list(tmp_path.iterdir()) == []
    # the suggested budget plans and runs (an explicit budget is honoured on the CPU)
    assert run(capsys, *gen(tiny, tmp_path / "a.png"), "--vram", vram)[0] == 0


def test_host_oom_during_a_run(tiny, tmp_path, capsys, monkeypatch):
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr("zimage_lite.pipeline.euler_sample", _raiser("euler_sample", oom))
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"))
    one_line(code, err, "out of host memory in phase transformer")


# -- bugs and -v ------------------------------------------------------------------------------------
def test_a_bug_is_one_line_and_verbose_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "zimage_lite.pipeline.euler_sample", _raiser("euler_sample", ZeroDivisionError("oops"))
    )
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"))
    one_line(code, err, "internal error (ZeroDivisionError: oops); run with -v", exit_code=1)
    code, err = run(capsys, *gen(tiny, tmp_path / "a.png"), "-v")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("zimage-lite: error:")


# -- argument types ------------------------------------------------------------------------------------
def test_seed_range_is_what_torch_accepts_without_aliases():
    torch.Generator().manual_seed(cli_args.SEED_MAX)
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(cli_args.SEED_MAX + 1)
    assert cli_args.seed("0") == 0 and cli_args.seed(str(cli_args.SEED_MAX)) == cli_args.SEED_MAX
    for bad in ("-1", str(cli_args.SEED_MAX + 1), "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_args.seed(bad)


def test_size_bound_is_the_rope_table():
    from zimage_lite.config import DiTConfig

    cfg = DiTConfig()
    assert cli_args.SIZE_MAX == 8192 == cfg.axes_lens[1] * 8 * cfg.patch_size
    assert cli_args.image_size("16") == 16 and cli_args.image_size("8192") == 8192
    for bad in ("0", "8", "8208", "50", "-16"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_args.image_size(bad)


def test_vram_suggestion_is_the_planner_minimum(tiny):
    from zimage_lite.pipeline import Pipeline

    pipe = Pipeline.load(tiny, device="cpu")
    n = preflight.vram_minimum(pipe, 64, 64, 1, 8)
    assert n is not None and n <= 1 * GIB
    assert preflight._plans(pipe, n, 64, 64, 1, 8)
    assert not preflight._plans(pipe, n - 64 * MIB, 64, 64, 1, 8)


def test_interrupted_synthetic_leaves_nothing(tmp_path, capsys, monkeypatch):
    def half_then_interrupt(out, **kwargs):
        (Path(out) / "transformer").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr("zimage_lite.synthetic.write_synthetic_model", half_then_interrupt)
    code, err = run(capsys, "synthetic", tmp_path / "model")
    one_line(code, err, "interrupted; nothing was kept", exit_code=130)
    assert list(tmp_path.iterdir()) == []


def test_verbose_before_or_after_the_command():
    from zimage_lite.cli import build_parser

    assert build_parser().parse_args(["inspect", "x", "-v"]).verbose
    assert build_parser().parse_args(["-v", "inspect", "x"]).verbose
    assert not build_parser().parse_args(["inspect", "x"]).verbose


def test_output_path_types(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert cli_args.output_file(str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert cli_args.output_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert cli_args.convert_output(str(tmp_path / "dir")) == str(tmp_path / "dir")
    bad = [
        (cli_args.output_file, tmp_path / "dir", "is a folder"),
        (cli_args.output_file, tmp_path / "missing" / "a.png", "output folder does not exist"),
        (cli_args.output_folder, tmp_path / "file", "is a file, not a folder"),
        (cli_args.output_folder, tmp_path / "file" / "sub", "is a file, not a folder"),
        (cli_args.convert_output, tmp_path / "file" / "x.gguf", "is a file, not a folder"),
        (cli_args.output_file, " ", "empty path"),
    ]
    for parse, path, message in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(str(path))
    assert not (tmp_path / "new").exists()  # checking never creates anything
