"""The bench's calibrated rows (--imatrix, --target-size) on the small synthetic model with outlier channels.

Two bench runs share one cache: the first has the plain and the +imatrix q4_k rows, the second adds a
target-size row at the plain q4_k files' size and a +rules row (refiners in BF16, with the imatrix). The GGUFs are read back with gguf-py (not our reader) for the
imatrix record llama-quantize writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import gguf
import pytest

from zimage_lite.bench import runner
from zimage_lite.bench.markdown import render_markdown
from zimage_lite.bench.schema import validate_report
from zimage_lite.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libggml") is None, reason="no libggml-python wheel")


def _bench(model: Path, root: Path, *extra: str) -> dict:
    """One bench run into root/out (--force: the second run replaces the first's report)."""
    parser = argparse.ArgumentParser()
    runner.add_bench_arguments(parser)
    args = parser.parse_args(
        ["--model", str(model), "--precisions", "bf16,q4_k", "--prompts", "1", "--steps", "1",
         "--width", "32", "--height", "32", "--warmup", "0", "--device", "cpu", "--out", str(root / "out"),
         "--cache", str(root / "cache"), "--force", "-q", *extra]
    )  # fmt: skip
    return runner.run_bench(runner.config_from_args(args))


def _ggufs(row: dict) -> list[Path]:
    return sorted(Path(row["source"]).glob("*.gguf"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from zimage_lite.pipeline import Pipeline
    from zimage_lite.quant.imatrix import collect
    from zimage_lite.synthetic import write_synthetic_model
    from zimage_lite.weights.imatrix_io import write_imatrix

    root = tmp_path_factory.mktemp("bench-imatrix")
    model = write_synthetic_model(root / "model", "small", seed=3, outliers=True)
    im = collect(
        Pipeline.load(model, device="cpu"), ["a fox", "一只猫"], steps=1, width=32, height=32, dataset="t"
    )
    im_path = write_imatrix(im, root / "im.gguf")
    first = _bench(model, root, "--imatrix", str(im_path), "--no-images")
    plain = next(r for r in first["rows"] if r["name"] == "q4_k")
    target = sum(p.stat().st_size for p in _ggufs(plain))
    second = _bench(
        model,
        root,
        "--imatrix",
        str(im_path),
        "--target-size",
        f"{target}B",
        "--tensor-type-rules",
        "refiner=bf16",
    )
    return im_path, first, second, target


def test_imatrix_rows_sit_next_to_the_plain_rows_and_are_measured(runs):
    _, first, _, _ = runs
    rows = {r["name"]: r for r in first["rows"]}
    assert list(rows) == ["bf16", "q4_k", "q4_k+imatrix"]
    assert all(r["status"] == "ok" for r in rows.values()) and validate_report(first) == []
    for name in ("q4_k", "q4_k+imatrix"):
        q = rows[name]["quality"]
        assert 0 < q["latent_rel_error_mean"] < 1 and math.isfinite(q["psnr_db_mean"])
    assert (
        rows["q4_k+imatrix"]["quality"]["latent_rel_error_mean"]
        != rows["q4_k"]["quality"]["latent_rel_error_mean"]
    )
    assert rows["q4_k+imatrix"]["source"] != rows["q4_k"]["source"]
    assert rows["q4_k"]["recipe"] is None
    assert first["settings"]["imatrix"]["chunks"] == 2 and first["settings"]["target_sizes"] == []


def test_imatrix_rows_are_converted_with_the_imatrix(runs):
    im_path, first, _, _ = runs
    rows = {r["name"]: r for r in first["rows"]}
    for path in _ggufs(rows["q4_k+imatrix"]):
        fields = gguf.GGUFReader(str(path)).fields
        assert Path(fields["quantize.imatrix.file"].contents()) == im_path.resolve()
        assert fields["quantize.imatrix.chunks_count"].contents() == 2
    for path in _ggufs(rows["q4_k"]):
        assert "quantize.imatrix.file" not in gguf.GGUFReader(str(path)).fields
    rec = rows["q4_k+imatrix"]["recipe"]
    assert rec["imatrix_sha256"] == first["settings"]["imatrix"]["sha256"] and rec["imatrix_tensors"] > 0
    assert rows["q4_k+imatrix"]["imatrix"].startswith("im.gguf (2 chunks, t)")
    md = render_markdown(first)
    assert "Importance matrix: `im.gguf`" in md and "| q4_k+imatrix | yes | – | – |" in md


def test_a_second_run_reuses_the_converted_files(runs):
    _, first, second, _ = runs
    before = {r["name"]: r for r in first["rows"]}
    rows = {r["name"]: r for r in second["rows"]}
    for name in ("q4_k", "q4_k+imatrix"):
        assert before[name]["convert"]["cached"] is False and rows[name]["convert"]["cached"] is True
        assert rows[name]["source"] == before[name]["source"]


def test_target_size_row_fits_the_size_and_reports_its_bytes(runs):
    _, _, second, target = runs
    rows = {r["name"]: r for r in second["rows"]}
    name = f"target:{target}B"
    assert (
        list(rows) == ["bf16", "q4_k", "q4_k+imatrix", "q4_k+rules", name] and validate_report(second) == []
    )
    row = rows[name]
    assert row["status"] == "ok" and row["convert"]["cached"] is False
    rec = row["recipe"]
    files = sum(p.stat().st_size for p in _ggufs(row))
    assert rec["gguf_bytes"] == files <= target == rec["target_bytes"]
    assert rec["imatrix_sha256"] is not None and sum(rec["types"].values()) > 0
    assert 0 < row["quality"]["latent_rel_error_mean"] < 1
    assert f"| {name} | yes | – | {target}B ({target} B) | {files} |" in render_markdown(second)
    image = row["quality"]["per_image"][0]["image"]
    assert (
        ":" not in image and (Path(second["settings"]["reference_folder"]).parent / "out" / image).is_file()
    )


def _refiner_types(row: dict) -> set[str]:
    reader = gguf.GGUFReader(str(Path(row["source"]) / "transformer.gguf"))
    return {t.tensor_type.name for t in reader.tensors if "refiner" in t.name and len(t.shape) == 2}


def test_rules_row_keeps_the_refiners_in_bf16_with_the_imatrix(runs):
    _, _, second, _ = runs
    rows = {r["name"]: r for r in second["rows"]}
    row = rows["q4_k+rules"]
    assert row["status"] == "ok" and row["convert"]["cached"] is False
    assert _refiner_types(row) == {"BF16"} and _refiner_types(rows["q4_k"]) - {"BF16", "F32"}
    rec = row["recipe"]
    assert rec["rules"] == "refiner=bf16" == second["settings"]["tensor_type_rules"]
    assert (
        rec["imatrix_sha256"] is not None and rec["gguf_bytes"] > rows["q4_k+imatrix"]["recipe"]["gguf_bytes"]
    )
    assert 0 < row["quality"]["latent_rel_error_mean"] < 1
    assert "| q4_k+rules | yes | `refiner=bf16` | – |" in render_markdown(second)


def test_bad_rules_is_one_error_line(tmp_path, capsys):
    argv = ["bench", "--synthetic", "tiny", "--precisions", "bf16,q8_0", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "-q", "--tensor-type-rules", "refiner=q9"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zimage-lite: error:") and "refiner=q9" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "no such imatrix file"),
        (b"not an imatrix", "--imatrix"),
        ("model", "--imatrix needs a K-quant"),
    ],
)
def test_bad_imatrix_is_one_error_line(tmp_path, capsys, content, match):
    path = tmp_path / "im.dat"
    if isinstance(content, bytes):
        path.write_bytes(content)
    argv = ["bench", "--synthetic", "tiny", "--precisions", "bf16,q8_0", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "-q", "--imatrix", str(path)]  # fmt: skip
    if content == "model":  # a real file, but no precision that takes an imatrix
        path = tmp_path / "im.gguf"
        argv[-1] = str(path)
        import torch

        from zimage_lite.quant.imatrix import Entry, Imatrix
        from zimage_lite.weights.imatrix_io import write_imatrix

        write_imatrix(Imatrix({"x.weight": Entry(torch.ones(8, dtype=torch.float64), 4)}, 1, 4, ["t"]), path)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zimage-lite: error:") and match in err[0]
    assert not (tmp_path / "out").exists()
