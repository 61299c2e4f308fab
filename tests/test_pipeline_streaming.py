"""Generation under a VRAM budget on the CPU: the streamed run is bit-identical to the resident one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zimage_lite.cli import main
from zimage_lite.errors import UsageError
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.budget import parse_vram

MB = 1 << 20


@pytest.fixture(scope="module")
def resident(quantized):
    pipe = Pipeline.load(quantized, device="cpu")
    latents = pipe.generate_latents("a harbour at night", seed=4, width=64, height=48)
    return latents, np.asarray(pipe.decode(latents)[0])


def _minimum(quantized) -> int:
    """The smallest budget that plans, read from the refusal message of a far too small one."""
    pipe = Pipeline.load(quantized, device="cpu", vram=1 * MB)
    with pytest.raises(UsageError, match="below the minimum") as info:
        pipe.generate_latents("a harbour at night", seed=4, width=64, height=48)
    return parse_vram(str(info.value).split("below the minimum ")[1].split(" for")[0].replace(" ", ""))


def test_streamed_generation_is_bit_identical(quantized, resident):
    budget = 14 * MB  # forces the transformer's blocks through the ring (see stats below)
    pipe = Pipeline.load(quantized, device="cpu", vram=budget)
    latents = pipe.generate_latents("a harbour at night", seed=4, width=64, height=48)
    assert torch.equal(latents, resident[0])
    assert np.array_equal(np.asarray(pipe.decode(latents)[0]), resident[1])
    stats = pipe.last_stats.to_dict()["streaming"]
    dit = stats["transformer"]
    assert dit["streamed_blocks"] > 0 and dit["h2d_bytes"] > 0 and dit["prefetch_misses"] == 0
    plan = stats["plans"]["transformer"]
    assert plan["total_bytes"] <= budget
    memory = pipe.last_stats.device_memory  # each phase within the budget, and given back
    assert all(m["before"] == m["after"] == 0 and m["peak"] <= budget for m in memory.values())


def test_budget_below_minimum_is_refused_before_any_work(quantized):
    pipe = Pipeline.load(quantized, device="cpu", vram=2 * MB)
    with pytest.raises(UsageError, match=r"VRAM budget 2\.0 MB is below the minimum"):
        pipe.generate_latents("a harbour at night", seed=4, width=64, height=48)
    assert pipe.last_stats.steps == []  # refused up front: no step ran


def test_cli_budget_too_small_is_one_line(quantized, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(quantized), "--vram", "1MB", "-o", str(tmp_path / "a.png"),
                 "--width", "64", "--height", "64", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "below the minimum" in err[0]
    assert not (tmp_path / "a.png").exists()


def test_cli_stats_report_streaming(quantized, tmp_path, capsys):
    stats = tmp_path / "s.json"
    code = main(["generate", "x", "--model", str(quantized), "--vram", "14MB", "-o", str(tmp_path / "a.png"),
                 "--width", "64", "--height", "48", "--steps", "2", "--stats", str(stats), "--device", "cpu"])  # fmt: skip
    assert code == 0
    data = json.loads(stats.read_text())
    assert data["streaming"]["transformer"]["h2d_bytes"] > 0
    assert set(data["streaming"]["plans"]) == {
        "text_encoder",
        "transformer",
        "vae",
        "vae_tile",
        "keep",
        "transformer_chunks",
    }
    assert set(data["device_memory"]) == {"text_encoder", "transformer", "vae"}


def test_minimum_budget_is_exact_and_still_identical(quantized, resident):
    minimum = _minimum(quantized)
    pipe = Pipeline.load(quantized, device="cpu", vram=minimum + MB // 10)  # message rounds to 0.1 MB
    assert torch.equal(pipe.generate_latents("a harbour at night", seed=4, width=64, height=48), resident[0])
