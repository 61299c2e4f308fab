"""On paper, from the planner (benchmarks/controlnet_plan.py): the real q4_k_m transformer plus a real
q4_k_m 2.1 ControlNet at 1024x1024 inside a 6 GB card, and the one-live-hint scheme's saving."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GIB = 1 << 30
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "controlnet_plan.py"


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("controlnet_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paper_plan("6GB", 1024, 1024, "q4_k_m", "2.1")


def test_q4_k_m_transformer_and_2_1_controlnet_fit_a_6gb_card(paper):
    both, alone = paper["transformer+controlnet"], paper["transformer"]
    assert both["blocks"] == 34 + 17  # 2 + 2 + 30 DiT blocks, 15 control + 2 control-refiner blocks
    assert both["total_bytes"] <= 6 * GIB and both["streamed"] > 0 and alone["streamed"] == 0
    # what streaming costs per step: ~1.2 GB, about 50 ms over PCIe 4.0 x16 with pinned memory
    assert 0.5 * GIB < both["streamed_bytes_per_step"] < 2 * GIB


def test_one_live_hint_saves_the_other_fourteen(paper):
    hints = paper["hint_bytes"]  # c + 1 hint vs c + 15 hints of 4608 tokens x 3840 x 2 bytes
    assert hints["one_live"] == 2 * 4608 * 3840 * 2
    assert hints["all_live"] - hints["one_live"] == 14 * 4608 * 3840 * 2  # ~0.5 GB
    # held up front (diffusers' way) they push blocks out of the card: more streamed per step
    held = paper["all_hints_live"]
    assert held["streamed_bytes_per_step"] > paper["transformer+controlnet"]["streamed_bytes_per_step"]
