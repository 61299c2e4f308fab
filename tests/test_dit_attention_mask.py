"""SDPA gets no mask when no key needs hiding, so CUDA can use its flash kernel.

PyTorch's flash-attention backend takes no attn_mask at all: any mask sends SDPA to the
memory-efficient or cuDNN kernels. A mask is only needed when batch items have different lengths;
one prompt, or prompts whose padded lengths agree, must reach SDPA with attn_mask=None (diffusers'
ZImageTransformer2DModel does the same). The outputs stay those of diffusers (test_dit.py's
reference) in every case.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_dit import CFGS, make_pair, rel_err, run_ref

from zimage_lite.models import dit


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Every attn_mask the DiT hands to SDPA, in call order."""
    seen = []

    def recording_sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append(attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask, *args, **kwargs)

    # dit.F is torch.nn.functional itself: give dit.py its own copy so diffusers' calls are not seen
    monkeypatch.setattr(
        dit, "F", SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": recording_sdpa})
    )
    return seen


@pytest.mark.parametrize(
    ("cap_lens", "masked"),
    [([7], False), ([32], False), ([45, 45], False), ([33, 64], False), ([5, 40], True)],
    ids=["one-prompt", "one-prompt-exact-32", "equal-batch", "equal-after-padding", "unequal-batch"],
)
def test_mask_only_where_lengths_differ(sdpa_masks, cap_lens, masked):
    cfg = CFGS["one_refiner"]
    ref, ours = make_pair(cfg)
    b = len(cap_lens)
    latents, t = torch.randn(b, cfg.in_channels, 8, 8), torch.rand(b)
    caps = [torch.randn(n, cfg.cap_feat_dim) for n in cap_lens]
    with torch.no_grad():
        got = ours(latents, t, caps)
        assert rel_err(got, run_ref(ref, latents, t, caps)) <= 1e-5
    n_attention = cfg.n_layers + 2 * cfg.n_refiner_layers  # noise and context refiners, main layers
    assert len(sdpa_masks) == n_attention
    if masked:
        assert any(m is not None for m in sdpa_masks)
    else:
        assert all(m is None for m in sdpa_masks)


@pytest.mark.gpu
def test_one_prompt_runs_on_the_flash_kernel():
    """With only the flash backend allowed, a mask would raise "No available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = CFGS["one_refiner"]
    _, ours = make_pair(cfg, dtype=torch.bfloat16)
    ours = ours.cuda()
    latents, t = torch.randn(1, cfg.in_channels, 8, 8, device="cuda"), torch.rand(1, device="cuda")
    caps = [torch.randn(7, cfg.cap_feat_dim, device="cuda", dtype=torch.bfloat16)]
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert torch.isfinite(ours(latents, t, caps)).all()
