"""On paper, from the planner: the real q4_k_m transformer plus a real q4_k_m Fun-Controlnet-Union 2.1 at
1024x1024 inside an emulated card, and what streaming costs per step. Nothing is allocated: both models
are built on the meta device with the conversion policy's storage types (quant/policy.py).

  python benchmarks/controlnet_plan.py --card 6GB [--width 1024 --height 1024 --quant q4_k_m]

Prints the plan (resident / streamed blocks, bytes per kind) and the host-to-device bytes one step
streams, with and without the one-live-hint scheme (models/controlnet.py), and the same without a
ControlNet for comparison. Writes nothing.
"""

from __future__ import annotations

import argparse
import json

import torch

from zimage_lite.config import CONTROLNET_VERSIONS, ControlNetConfig, DiTConfig
from zimage_lite.models.controlnet import ZImageControlNet, live_hint_bytes
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.quant.policy import choose_qtype
from zimage_lite.runtime.budget import CARD_CONTEXT_BYTES, VramBudget, allocator_margin, parse_vram
from zimage_lite.runtime.planner import dit_tokens, plan_blocks, plan_transformer
from zimage_lite.runtime.quant_linear import swap_linears
from zimage_lite.weights.load import build_meta


def quantized_meta(factory, preset: str, component: str) -> torch.nn.Module:
    """A meta-built model whose linears carry the types `convert --quant preset` would give them."""
    model = build_meta(factory).to(torch.bfloat16)
    qtypes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            qtype = choose_qtype(f"{name}.weight", tuple(m.weight.shape), preset, component)
            if qtype not in ("F32", "BF16"):
                qtypes[name] = qtype
    swap_linears(model, qtypes, torch.bfloat16)
    return model


def real_controlnet(version: str = "2.1") -> ControlNetConfig:
    v = CONTROLNET_VERSIONS[version]
    return ControlNetConfig(version, 3840, 30, v["in_dim"], v["places"], v["refiner_places"],
                            0 if version == "2.0" else 2)  # fmt: skip


def paper_plan(card: str, width: int, height: int, preset: str = "q4_k_m", version: str = "2.1") -> dict:
    total = parse_vram(card)
    budget = VramBudget(total, CARD_CONTEXT_BYTES, "card", allocator_margin(total))
    dit = quantized_meta(lambda: ZImageDiT(DiTConfig()), preset, "transformer")
    net = quantized_meta(lambda: ZImageControlNet(real_controlnet(version)), preset, "controlnet")
    over = dict(context_bytes=budget.context_bytes, margin_bytes=budget.margin_bytes)
    out = {"card": card, "size": f"{width}x{height}", "quant": preset, "controlnet": version}
    for label, cn in (("transformer", None), ("transformer+controlnet", net)):
        plan = plan_transformer(dit, total, width, height, dtype=torch.bfloat16, controlnet=cn, **over)
        out[label] = {
            "blocks": len(plan.block_bytes), "resident": len(plan.resident), "streamed": len(plan.streamed),
            "ring_slots": plan.ring_slots, "total_bytes": plan.total_bytes, "budget_bytes": total,
            "streamed_bytes_per_step": sum(plan.block_bytes[i] for i in plan.streamed),
            "accounted": dict(plan.accounted),
        }  # fmt: skip
    tokens = sum(dit_tokens(dit.config, width, height))
    cfg = net.config
    hints = {
        "one_live": live_hint_bytes(cfg, tokens, 1, 2),
        "all_live": live_hint_bytes(cfg, tokens, 1, 2, False),
    }
    out["hint_bytes"] = hints
    # the same plan with every hint computed up front and held (as diffusers does): more to stream
    a = plan.accounted
    held = plan_blocks(
        plan.block_bytes, total, fixed_bytes=a["fixed_weights"], scratch_bytes=a["dequant_scratch"],
        activation_bytes=a["activations"] + hints["all_live"] - hints["one_live"], **over,
    )  # fmt: skip
    out["all_hints_live"] = {
        "resident": len(held.resident), "streamed": len(held.streamed),
        "streamed_bytes_per_step": sum(held.block_bytes[i] for i in held.streamed),
    }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="6GB")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--version", default="2.1", choices=list(CONTROLNET_VERSIONS))
    args = ap.parse_args()
    print(json.dumps(paper_plan(args.card, args.width, args.height, args.quant, args.version), indent=2))


if __name__ == "__main__":
    main()
