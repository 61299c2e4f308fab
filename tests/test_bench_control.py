"""`bench --controlnet`: a control row per precision, compared with the reference precision under the
same control (tiny synthetic model and a synthetic 2.1-style ControlNet of its width)."""

from __future__ import annotations

import math

from zimage_lite.bench import runner
from zimage_lite.bench.prompts import bench_prompts
from zimage_lite.bench.schema import validate_report


def test_control_rows_compare_with_the_reference_control_row(tmp_path):
    cfg = runner.BenchConfig(
        out=tmp_path / "out", synthetic="tiny", precisions=["bf16", "q8_0"], prompts=bench_prompts(1), steps=2,
        width=48, height=32, warmup=0, controlnet=runner.Path("synthetic"), cache=tmp_path / "cache",
        progress=False,
    )  # fmt: skip
    report = runner.run_bench(cfg)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["bf16", "q8_0", "bf16+control", "q8_0+control"]
    assert all(r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    ref, q8 = rows["bf16+control"], rows["q8_0+control"]
    assert math.isinf(ref["quality"]["psnr_db_min"])  # compared with itself
    assert 0 < q8["quality"]["latent_rel_error_max"] < 0.2
    # the control changed the picture: the control reference is not the plain reference
    plain = rows["bf16"]["quality"]["per_image"][0]["image"]
    assert (tmp_path / "out" / plain).read_bytes() != (
        tmp_path / "out" / ref["quality"]["per_image"][0]["image"]
    ).read_bytes()
    assert validate_report(report) == []
