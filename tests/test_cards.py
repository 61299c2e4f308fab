"""Card generations: the compute dtype per compute capability (injected, so tested on the CPU), the
refusal below Pascal, and a GTX 1060 6GB's whole q4_k_m plan at 1024x1024 in float32."""

from __future__ import annotations

import pytest
import torch

from zimage_lite.cli import main
from zimage_lite.config import DiTConfig, Qwen3Config, VAEConfig
from zimage_lite.errors import UsageError
from zimage_lite.runtime.cards import compute_dtype
from zimage_lite.weights.load import build_meta


@pytest.mark.parametrize(
    "capability,expected",
    [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((7, 5), torch.float16), ((7, 0), torch.float16),
     ((6, 1), torch.float32), ((6, 0), torch.float32), (None, torch.float32)],
)  # fmt: skip
def test_each_generation_computes_in_its_dtype(capability, expected):
    assert compute_dtype(capability) == expected


@pytest.mark.parametrize("capability", [(5, 2), (3, 5)])
def test_cards_below_pascal_are_refused_in_one_line(capability):
    with pytest.raises(
        UsageError, match=r"older than Pascal: zimage-lite needs compute capability 6\.0"
    ) as e:
        compute_dtype(capability)
    assert "\n" not in str(e.value)


def test_a_maxwell_card_is_refused_by_the_cli(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (5, 2))
    code = main(
        ["generate", "a fox", "--model", str(tmp_path), "--device", "cuda", "-o", str(tmp_path / "o.png")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sm 5.2) is older than Pascal" in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_requested_dtypes_on_older_cards():
    assert compute_dtype((6, 1), torch.float16) == torch.float16  # allowed (slow on consumer Pascal)
    with pytest.raises(UsageError, match="no bfloat16 support"):
        compute_dtype((7, 5), torch.bfloat16)


def _q4_k_m(model: torch.nn.Module, component: str) -> torch.nn.Module:
    """Swap in QuantLinears with the q4_k_m preset's type per linear (quant/policy.py), on meta."""
    from zimage_lite.quant.policy import choose_qtype
    from zimage_lite.runtime.quant_linear import swap_linears

    qtypes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            qtype = choose_qtype(f"{name}.weight", tuple(m.weight.shape), "q4_k_m", component)
            if qtype not in ("F32", "BF16"):
                qtypes[name] = qtype
    swap_linears(model, qtypes, torch.float32)
    return model


def test_gtx_1060_6gb_runs_q4_k_m_at_1024_in_float32():
    """As a GTX 1060 6GB (sm 6.1) runs it: float32 compute (4-byte activations), the torch dequantization
    path (no Triton kernels there), `--card 6GB`'s budget (512 MB context and display, allocator margin);
    the full-size q4_k_m model, built on the meta device. Every phase plans inside the card, one at a
    time (measured: text encoder 3.1 GB, transformer 5.7 GB with all 34 blocks resident and 952 MB of
    activations, VAE decode 5.9 GB untiled)."""
    from zimage_lite.models.dit import ZImageDiT
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.models.vae import VAE
    from zimage_lite.runtime.budget import CARD_CONTEXT_BYTES, GIB, VramBudget, allocator_margin
    from zimage_lite.runtime.phases import plan_phases

    dtype = compute_dtype((6, 1))
    assert dtype == torch.float32
    te = _q4_k_m(build_meta(lambda: Qwen3Encoder(Qwen3Config())).to(dtype), "text_encoder")
    dit = _q4_k_m(build_meta(lambda: ZImageDiT(DiTConfig())).to(dtype), "transformer")
    vae = build_meta(lambda: VAE(VAEConfig())).to(dtype)
    card = 6 * GIB
    budget = VramBudget(card, CARD_CONTEXT_BYTES, "card", allocator_margin(card))
    plans = plan_phases(te, dit, vae, budget, torch.device("cpu"), width=1024, height=1024, images=1,
                        caption_tokens=512, dtype=dtype)  # fmt: skip
    for name in ("text_encoder", "transformer", "vae"):
        assert plans.of(name).total_bytes <= card, plans.of(name).summary()
    t = plans.transformer
    from zimage_lite.runtime.planner import dit_activation_bytes

    cfg = DiTConfig()
    assert t.accounted["activations"] == dit_activation_bytes(cfg, 1024, 1024, 1, torch.float32, 512)
    assert t.accounted["activations"] > 1.5 * dit_activation_bytes(cfg, 1024, 1024, 1, torch.bfloat16, 512)
    assert t.accounted["fp32_fallback"] == 0  # already float32: nothing to retry
    assert t.accounted["dequant_scratch"] == 3 * 3840 * 3840 * (4 + 8)  # qkv to float32, torch path
    assert not plans.keep  # each phase gives its memory back before the next


def test_readme_has_the_table():
    from pathlib import Path

    from zimage_lite.runtime.cards import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
