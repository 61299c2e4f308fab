"""The tiny end-to-end bench (CPU): report schema, the reference row, quantized rows, files, the cache.

One bench run (tiny synthetic model, 2 prompts x 1 seed, 64x64, 2 steps) is shared by the tests. The
diffusers row is an outside check of the harness itself: diffusers' ZImagePipeline on the same weights
must land on our reference latents (float32 on both sides).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from PIL import Image

from zimage_lite.bench import runner, sources
from zimage_lite.bench.prompts import bench_prompts
from zimage_lite.bench.runner import add_bench_arguments, config_from_args, run_bench_from_args
from zimage_lite.bench.schema import validate_report
from zimage_lite.errors import UsageError
from zimage_lite.quant.formats import pick_quantizer, quantizer_version

QUANTS = ("q8_0", "q4_k")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    args = _args(
        "--synthetic", "tiny", "--precisions", ",".join(("bf16", *QUANTS)), "--prompts", "2", "--seeds", "0",
        "--steps", "2", "--width", "64", "--height", "64", "--repeats", "1", "--warmup", "1",
        "--device", "cpu", "--out", str(out), "--cache", str(cache), "--baselines", "diffusers", "-q",
    )  # fmt: skip
    rc = run_bench_from_args(args)
    report = json.loads((out / "report.json").read_text())
    return rc, report, out, cache


def _row(report: dict, name: str) -> dict:
    return next(r for r in report["rows"] if r["name"] == name)


def test_report_follows_schema(bench):
    rc, report, _, _ = bench
    assert validate_report(report) == []
    failed = {r["name"]: r["reason"] for r in report["rows"] if r["status"] == "failed"}
    assert rc == (1 if failed else 0)
    assert not {"bf16", "diffusers-bf16"} & set(failed)
    assert [r["name"] for r in report["rows"]][:3] == ["bf16", *QUANTS]
    assert report["settings"]["width"] == 64 and len(report["settings"]["prompts"]) == 2


def test_schema_checker_catches_mistakes(bench):
    report = json.loads(json.dumps(bench[1]))
    report["rows"][0]["quality"]["psnr_db_mean"] = "Infinity"
    del report["rows"][1]["timing"]["samples"]
    report["rows"][2]["status"] = "done"
    problems = validate_report(report)
    assert {p.split(":")[0] for p in problems} == {
        "rows[0].quality.psnr_db_mean", "rows[1].timing.samples", "rows[1]", "rows[2].status"
    }, problems  # fmt: skip


def test_reference_row_is_exact(bench):
    ref = _row(bench[1], "bf16")
    assert ref["status"] == "ok" and ref["compute_dtype"] == "float32"  # CPU reference computes in fp32
    q = ref["quality"]
    assert q["psnr_db_mean"] == "inf" and float(q["psnr_db_mean"]) == math.inf
    assert q["latent_rel_error_mean"] == 0 and q["latent_rel_error_max"] == 0
    assert q["ssim_mean"] == pytest.approx(1.0, abs=1e-12)
    assert all(e["psnr_db"] == "inf" and e["latent_rel_error"] == 0 for e in q["per_image"])
    assert ref["deterministic"] is True  # warm-up and first timed generation: identical latents


def test_quantized_rows_measure_a_loss(bench):
    errors = {}
    for name in QUANTS:
        row = _row(bench[1], name)
        assert row["status"] == "ok", row["reason"]
        q = row["quality"]
        assert math.isfinite(q["psnr_db_mean"]) and 0 < q["ssim_mean"] < 1
        assert 0 < q["latent_rel_error_mean"] < 1
        assert row["files"]["transformer_bytes"] < _row(bench[1], "bf16")["files"]["transformer_bytes"]
        errors[name] = q["latent_rel_error_mean"]
        assert f"| **{name}** |" in (bench[2] / "report.md").read_text()
    assert errors["q8_0"] < errors["q4_k"]  # 8 bits per weight lose less than ~4.5


def test_diffusers_row_agrees_with_reference(bench):
    report = bench[1]
    row = _row(report, "diffusers-bf16")
    assert row["status"] == "ok", row["reason"]
    assert row["quality"]["latent_rel_error_max"] < 1e-4  # same fp32 maths, different summation order
    assert float(row["quality"]["psnr_db_min"]) > 40
    for skipped in ("diffusers-offload", *(f"diffusers-gguf-{q}" for q in QUANTS)):
        assert _row(report, skipped)["status"] == "skipped"
        assert _row(report, skipped)["reason"] == "needs a CUDA device"


def test_timings_and_files(bench):
    _, report, out, _ = bench
    for row in (r for r in report["rows"] if r["status"] == "ok"):
        t = row["timing"]
        assert t["samples"] == 2 and t["s_per_image_median"] > 0 and t["s_per_step_median"] > 0
        assert t["s_per_step_median"] < t["s_per_image_median"]
        for entry in row["quality"]["per_image"]:
            assert Image.open(out / entry["image"]).size == (64, 64)
    assert set(_row(report, "bf16")["timing"]["phases_s_median"]) == {"text_encoder", "denoise", "vae"}
    md = (out / "report.md").read_text()
    assert "| **bf16** | float32 |" in md and "| diffusers-bf16 | float32 |" in md and "∞" in md
    done = [r for r in report["rows"] if r["status"] == "ok"]
    assert all(f"| **{r['name']}** |" in md for r in done if r["kind"] == "zimage-lite")
    grid, plot = Image.open(out / "grid.png"), Image.open(out / "plot.png")
    assert grid.size[1] > len(done) * 128 and plot.size == (900, 560)  # a row of 128 px tiles per row


def test_rows_say_which_quantizer_wrote_their_files(bench):
    _, report, out, _ = bench
    expected = quantizer_version(pick_quantizer("cpu"))  # ggml's library where installed
    assert [_row(report, q)["quantizer"] for q in QUANTS] == [expected] * len(QUANTS)
    assert _row(report, "bf16")["quantizer"] is None  # the source weights: nobody quantized them
    assert (
        "| q4_k | " in (out / "report.md").read_text()
        and f"| {expected} |" in (out / "report.md").read_text()
    )


def test_conversions_are_cached(bench):
    _, _, _, cache = bench
    src = sources.synthetic_model("tiny", cache)  # the run's cached model: no rewrite
    path, info = sources.precision_source(src, "q8_0", cache, progress=False)
    assert info == {"cached": True, "convert_s": None}
    assert path == sources.converted_path(src, "q8_0", cache)
    assert sources.converted_path(src, "q4_k", cache) != path
    assert sources.precision_source(src, "bf16", cache, progress=False)[0] == src


def test_vram_cap_is_passed_and_recorded(bench):
    from zimage_lite.bench.engines import OursEngine

    src = sources.synthetic_model("tiny", bench[3])
    engine = OursEngine(src, "cpu", None, "6GB")
    assert engine.vram == {"requested": "6GB", "applied": True, "note": None, "card": None}
    # a 6 GB budget holds the tiny model: everything resident, uploaded once
    gen = engine.generate("a cat", 0, steps=1, width=64, height=64)
    assert gen.sample.h2d_bytes > 0 and engine.pinned_host_bytes() == 0  # the CPU pins nothing
    assert engine.generate("a cat", 0, steps=1, width=64, height=64).sample.h2d_bytes == 0  # kept
    engine.close()


def test_card_rows_run_as_on_that_card(bench, tmp_path):
    """--card adds one row per precision and card; the emulated card caps the device ledger, so a card
    too small for a phase fails that row (recorded, the run goes on) while a large one runs."""
    cfg = runner.BenchConfig(
        out=tmp_path / "out", synthetic="tiny", precisions=["bf16"], prompts=bench_prompts(1), steps=1,
        width=64, height=64, warmup=0, cards=["1MB", "64MB"], cache=bench[3], save_images=False,
        progress=False,
    )  # fmt: skip
    report = runner.run_bench(cfg)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["bf16", "bf16@1MB", "bf16@64MB"]
    assert rows["bf16@1MB"]["status"] == "failed" and "below the minimum" in rows["bf16@1MB"]["reason"]
    assert rows["bf16@64MB"]["status"] == "ok" and rows["bf16@64MB"]["vram_cap"]["card"] == "64MB"
    assert rows["bf16@64MB"]["memory"]["peak_vram_bytes"] <= 64 << 20
    assert report["settings"]["cards"] == ["1MB", "64MB"] and validate_report(report) == []


def test_hires_rows_compare_with_the_reference_hires_row(bench, tmp_path):
    """--hires adds one row per precision running the hires fix; images are the upscaled size, timings
    cover both passes, quality is measured against the reference precision's hires images."""
    cfg = runner.BenchConfig(
        out=tmp_path / "out", synthetic="tiny", precisions=["bf16", "q8_0"], prompts=bench_prompts(1), steps=2,
        width=32, height=48, warmup=0, hires=1.5, hires_strength=0.5, cache=bench[3], progress=False,
    )  # fmt: skip
    report = runner.run_bench(cfg)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["bf16", "q8_0", "bf16+hires1.5x", "q8_0+hires1.5x"]
    ref, q8 = rows["bf16+hires1.5x"], rows["q8_0+hires1.5x"]
    assert ref["status"] == q8["status"] == "ok"
    assert math.isinf(ref["quality"]["psnr_db_min"])  # compared with itself
    assert q8["quality"]["latent_rel_error_max"] > 0
    assert Image.open(tmp_path / "out" / ref["quality"]["per_image"][0]["image"]).size == (48, 64)
    assert len(ref["timing"]["phases_s_median"]) >= 4 and "vae_encode" in ref["timing"]["phases_s_median"]
    assert report["settings"]["hires"] == {"scale": 1.5, "strength": 0.5} and validate_report(report) == []


def test_streaming_counters_are_summed_over_phases():
    from zimage_lite.bench.engines import _h2d, _stat

    stats = {
        "phases_s": {},
        "streaming": {
            "plans": {"transformer": {"ring_slots": 2}},
            "text_encoder": {"h2d_bytes": 10, "resident_load_bytes": 1, "pinned_host_bytes": 4},
            "transformer": {"h2d_bytes": 100, "resident_load_bytes": 20, "pinned_host_bytes": 40},
        },
    }
    assert _h2d(stats) == 131 and _stat(stats, None, "pinned_host_bytes") == 44
    assert _h2d({"phases_s": {}}) is None and _stat({}, None, "pinned_host_bytes") is None


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--precisions", "bf16,q9_9"], "unknown precision q9_9"),
        (["--prompts", "0"], "--prompts must be >= 1"),
        (["--baselines", "comfy"], "unknown baseline"),
    ],
)
def test_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        config_from_args(_args("--synthetic", "tiny", *argv))


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--seeds", "1,a"], "argument --seeds: not an integer: 'a'"),
        (["--seeds", "-1"], "argument --seeds: must be from 0 to"),
        (["--repeats", "0"], "argument --repeats: must be from 1 to 1000 (got 0)"),
        (["--out", __file__], "argument --out: "),
    ],
)
def test_argument_errors_when_parsed(argv, match, capsys):
    with pytest.raises(SystemExit):
        _args("--synthetic", "tiny", *argv)
    assert match in capsys.readouterr().err


def test_defaults():
    cfg = config_from_args(_args("--synthetic", "tiny"))
    assert (cfg.width, cfg.height, cfg.steps) == (128, 128, 8)
    assert cfg.precisions == sources.available_precisions() and cfg.precisions[0] == "bf16"
    assert len(cfg.prompts) >= 5 and {p.kind for p in cfg.prompts} >= {
        "short",
        "long",
        "chinese",
        "mixed",
        "text",
    }
    assert config_from_args(_args("--synthetic", "full")).width == 1024
    assert config_from_args(_args("--synthetic", "tiny", "--precisions", "q4_k")).precisions == [
        "bf16",
        "q4_k",
    ]
