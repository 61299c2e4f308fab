"""Property: whatever the arguments, a command ends with a complete output (exit 0), or exit 2 with one
line on stderr, no traceback and nothing left in the output folder.

Hypothesis draws each option from valid values (small sizes, so a valid run takes a fraction of a second
on the tiny model), invalid values (out of range, wrong type, missing or wrong kind of path) and
arbitrary text. The model is built once; each example runs in a fresh folder, which is also the working
directory (generate's default `out.png` lands there). Examples are derandomized, so CI is repeatable.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from zimage_lite.cli import main, output_paths
from zimage_lite.synthetic import write_synthetic_model

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
EXISTING = ("existing.png", "folder/", "folder/inner.txt")  # what every example folder starts with


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The tiny model, a converted file, and broken inputs, built once for the module."""
    root = tmp_path_factory.mktemp("fuzz")
    tiny = write_synthetic_model(root / "tiny", "tiny", seed=0)
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(os.urandom(2000))
    shard = next((tiny / "vae").glob("*.safetensors"))
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(shard.read_bytes()[:5000])
    empty = root / "empty"
    empty.mkdir()
    main(["convert", str(tiny / "transformer"), "-o", str(root / "t.gguf"), "--quant", "q8_0", "-q"])
    return {
        "tiny": tiny, "transformer": tiny / "transformer", "vae": tiny / "vae", "gguf": root / "t.gguf",
        "garbage": garbage, "truncated": truncated, "empty": empty, "cache": root / "cache", "root": root,
    }  # fmt: skip


def _fresh_folder(world: dict[str, Path]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="example-", dir=world["root"]))
    (folder / "existing.png").write_bytes(b"not really a png")
    (folder / "folder").mkdir()
    (folder / "folder" / "inner.txt").write_text("keep me")
    return folder


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() + ("/" if p.is_dir() else "") for p in folder.rglob("*")}


class W(str):
    """A path from the `world` fixture, by its key."""


class H(str):
    """A path inside the example's folder."""


def _resolve(argv: list, world: dict[str, Path], folder: Path) -> list[str]:
    """W and H placeholders -> real paths; everything else -> its text."""
    return [str(world[a] if isinstance(a, W) else folder / a if isinstance(a, H) else a) for a in argv]


def _run(argv: list[str], folder: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def _check(argv: list[str], folder: Path, complete) -> None:
    """Run, then assert the property; `complete(code, stdout, new_files)` checks a successful output."""
    before = _listing(folder)
    code, out, err = _run(argv, folder)
    new = _listing(folder) - before
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    assert not [n for n in new if Path(n).name.startswith(".")], (argv, new)  # no temporary leftovers
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("zimage-lite"), (argv, err)
        assert new == set(), (argv, new)
    else:
        complete(out, folder, new)


# -- value strategies: valid, invalid, arbitrary ------------------------------------------------------
def _text() -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)


def _int_or_text(valid: st.SearchStrategy[int], slow: range = range(0)) -> st.SearchStrategy:
    """Mostly a valid value (so most examples get past the parser), else any integer but those in
    `slow` (valid, but seconds per example), or text."""
    other = st.integers(min_value=-(10**22), max_value=10**22).filter(lambda v: v not in slow)
    return st.integers(0, 9).flatmap(lambda k: valid if k < 7 else other if k < 9 else _text())


def _option(name: str, values: st.SearchStrategy) -> st.SearchStrategy[list]:
    """[] (option left out) or [name, value]."""
    return st.one_of(st.just([]), values.map(lambda v: [name, v]))


_OUT_FILE = st.sampled_from(
    [H("img.png"), H("existing.png"), H("folder"), H("missing/a.png"), H("folder/inner.txt/x")]
)
_SIZE = st.sampled_from([16, 32, 48])
_BIG_SIZES = range(49, 2048)  # larger sizes are refused up front (VAE attention memory), or are invalid


@st.composite
def generate_argv(draw) -> list:
    argv = ["generate", draw(st.one_of(st.just("a cat"), _text())), "--model"]
    argv.append(draw(st.sampled_from([W("tiny"), W("tiny"), W("garbage"), W("empty"), H("missing")])))
    # always given: the defaults (1024x1024, 8 steps) take seconds on the tiny model
    argv += [
        "--width",
        draw(_int_or_text(_SIZE, _BIG_SIZES)),
        "--height",
        draw(_int_or_text(_SIZE, _BIG_SIZES)),
    ]
    argv += ["--steps", draw(_int_or_text(st.integers(1, 2), range(3, 1001)))]
    for name, values in (
        ("--seed", _int_or_text(st.integers(0, 2**64 - 1))),
        ("--batch", _int_or_text(st.integers(1, 2), range(3, 65))),
        ("-o", _OUT_FILE),
        ("--stats", st.sampled_from([H("stats.json"), H("folder"), H("missing/s.json")])),
        ("--vram", st.one_of(st.sampled_from(["auto", "64MB", "1KB", "0", "-3GB"]), _text())),
        ("--dtype", st.sampled_from(["float32", "bfloat16", "int8"])),
        ("--device", st.sampled_from(["cpu", "cuda", "tpu"])),
    ):
        argv += draw(_option(name, values))
    return [*argv, "-q"]


def _generated(argv: list[str]):
    def complete(out: str, folder: Path, new: set[str]) -> None:
        opts = dict(zip(argv, argv[1:]))
        width, height = int(opts.get("--width", 1024)), int(opts.get("--height", 1024))
        for path in output_paths(Path(opts.get("-o", folder / "out.png")), int(opts.get("--batch", 1))):
            with Image.open(path) as img:
                assert img.size == (width, height) and int(img.text["seed"]) == int(opts.get("--seed", 0))
        if "--stats" in opts:
            assert json.loads(Path(opts["--stats"]).read_text())["width"] == width

    return complete


@pytest.mark.slow
@settings(FUZZ, max_examples=20)
@given(argv=generate_argv())
@example(argv=["generate", "a cat", "--model", W("tiny"), "--width", 32, "--height", 16, "--steps", 1,
               "--batch", 2, "--seed", 2**64 - 1, "-o", H("img.png"), "--stats", H("s.json"), "-q"])  # fmt: skip
@example(argv=["generate", "x", "--model", W("tiny"), "--width", 160000, "--height", 160000, "-q"])
@example(argv=["generate", "x", "--model", W("tiny"), "--seed", 10**20, "-o", H("folder"), "-q"])
@example(argv=["generate", "x", "--model", W("tiny"), "--width", 8192, "--height", 8192, "-q"])
def test_generate_fuzz(world, argv):
    folder = _fresh_folder(world)
    args = _resolve(argv, world, folder)
    _check(args, folder, _generated(args))


@st.composite
def convert_argv(draw) -> list:
    src = draw(
        st.sampled_from(
            [W("tiny"), W("transformer"), W("vae"), W("gguf"), W("garbage"), W("truncated"), H("missing")]
        )
    )
    out = draw(
        st.sampled_from(
            [H("out"), H("t.gguf"), H("t.safetensors"), H("existing.png"), H("folder"), H("new/deeper/x")]
        )
    )
    quant = draw(st.one_of(st.sampled_from(["q8_0", "q4_k", "fp8", "bf16", "q4_k_m", "Q8_0", "q9"]), _text()))
    argv = ["convert", src, "-o", out, "--quant", quant]
    argv += draw(_option("--threads", _int_or_text(st.integers(1, 2))))
    argv += draw(st.sampled_from([[], ["--force"]]))
    return [*argv, "-q"]


def _converted(out: str, folder: Path, new: set[str]) -> None:
    from zimage_lite.inspect import inspect_path

    written = Path(out.split("wrote ", 1)[1].split(" (", 1)[0])
    assert written.exists()
    assert inspect_path(written)  # readable, complete


@pytest.mark.slow
@FUZZ
@given(argv=convert_argv())
@example(argv=["convert", W("tiny"), "-o", H("out"), "--quant", "q4_k", "-q"])
@example(argv=["convert", W("transformer"), "-o", H("folder"), "--quant", "fp8", "--threads", 1, "-q"])
def test_convert_fuzz(world, argv):
    folder = _fresh_folder(world)
    _check(_resolve(argv, world, folder), folder, _converted)


def _inspected(out: str, folder: Path, new: set[str]) -> None:
    assert out.strip()


@pytest.mark.slow
@FUZZ
@given(
    path=st.one_of(
        st.sampled_from(
            [W("tiny"), W("transformer"), W("gguf"), W("garbage"), W("truncated"), W("empty"), H("missing")]
        ),
        _text(),
    ),
    as_json=st.booleans(),
)
def test_inspect_fuzz(world, path, as_json):
    folder = _fresh_folder(world)
    argv = _resolve(["inspect", path, *(["--json"] if as_json else [])], world, folder)
    _check(argv, folder, _inspected)


@st.composite
def bench_argv(draw) -> list:
    argv = ["bench", "--synthetic", "tiny", "--cache", W("cache"), "--precisions", "bf16", "--prompts", "1"]
    argv += ["--out", draw(st.sampled_from([H("report")] * 4 + [H("existing.png"), H("folder/inner.txt/x")]))]
    argv += ["--steps", draw(_int_or_text(st.integers(1, 1), range(2, 1001)))]
    for name, values in (
        ("--width", _int_or_text(_SIZE, _BIG_SIZES)),
        ("--seeds", st.one_of(st.sampled_from(["0", "1,2", "-1", "99999999999999999999", ""]), _text())),
        ("--warmup", _int_or_text(st.integers(0, 0), range(1, 1001))),
        ("--repeats", _int_or_text(st.integers(1, 1), range(2, 1001))),
    ):
        argv += draw(_option(name, values))
    return [*argv, "--no-images", "-q"]


def _benched(out: str, folder: Path, new: set[str]) -> None:
    report = json.loads((folder / "report" / "report.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["ok"]


@pytest.mark.slow
@settings(FUZZ, max_examples=8)
@given(argv=bench_argv())
@example(argv=["bench", "--synthetic", "tiny", "--cache", W("cache"), "--precisions", "bf16", "--prompts", "1",
               "--out", H("report"), "--steps", 1, "--warmup", 0, "--width", 32, "--no-images", "-q"])  # fmt: skip
@example(argv=["bench", "--synthetic", "tiny", "--cache", W("cache"), "--out", H("existing.png"), "-q"])
def test_bench_fuzz(world, argv):
    folder = _fresh_folder(world)
    _check(_resolve(argv, world, folder), folder, _benched)
