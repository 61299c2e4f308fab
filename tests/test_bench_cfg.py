"""The bench's CFG rows (--cfg): one row per precision with classifier-free guidance, compared with the
reference precision's CFG row."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from zimage_lite.bench import runner
from zimage_lite.bench.prompts import bench_prompts
from zimage_lite.bench.schema import validate_report


def test_cfg_rows_compare_with_the_reference_cfg_row(tmp_path):
    cfg = runner.BenchConfig(
        out=tmp_path / "out", synthetic="tiny", precisions=["bf16", "q8_0"], prompts=bench_prompts(1), steps=2,
        width=32, height=32, warmup=0, cfg=4.0, cache=tmp_path / "cache", progress=False,
    )  # fmt: skip
    report = runner.run_bench(cfg)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["bf16", "q8_0", "bf16+cfg4", "q8_0+cfg4"]
    assert all(r["status"] == "ok" for r in rows.values())
    ref, q8 = rows["bf16+cfg4"], rows["q8_0+cfg4"]
    assert math.isinf(ref["quality"]["psnr_db_min"])  # compared with itself
    assert q8["quality"]["latent_rel_error_max"] > 0
    # the cfg rows are not the plain rows again: guided and unguided images differ
    plain, guided = (
        np.asarray(Image.open(tmp_path / "out" / rows[n]["quality"]["per_image"][0]["image"])).astype(int)
        for n in ("bf16", "bf16+cfg4")
    )
    assert np.abs(plain - guided).mean() > 1
    assert report["settings"]["cfg"] == 4.0 and validate_report(report) == []
