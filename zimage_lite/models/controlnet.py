"""The Fun-Controlnet-Union control branch (alibaba-pai / VideoX-Fun) in plain torch, beside the DiT.

Parameter names are the alibaba-pai names with the DiT's renames (names_dit.py): fused `attention.qkv`,
`attention.out`, `q_norm`/`k_norm`, and `control_all_x_embedder.2-1.` -> `control_x_embedder.`.

How a branch works (diffusers `ZImageControlNetModel` and VideoX-Fun's `ZImageControlTransformer2DModel`
agree on everything but where refiner-stage hints go, see `ControlRun`):
- the control latents are patchified like the image, embedded by `control_x_embedder`, and their pad
  tokens become the transformer's `x_pad_token`;
- a control block is a full modulated DiT block over the control stream c. The first block of a chain adds
  the stream it controls through a zero-initialised `before_proj`: c = before_proj(c) + x; every block
  emits a hint after_proj(c);
- refiner stage (2.x): a chain over the image tokens whose block j's hint is added after noise-refiner
  layer refiner_places[j] (2.1: `control_noise_refiner`; 2.0: the main `control_layers`, run in full for
  their last c). v1 instead runs plain `control_noise_refiner` blocks over the control tokens alone;
- main stage: c (image tokens) joined with the refined caption tokens, then `control_layers` as a chain
  over the joint sequence, hint i added after main layer places[i].

A hint depends only on the stream's value before the chain's first block and on c, never on the
stream's later values, so each is computed just before the layer that takes it: one hint is live at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from zimage_lite.config import ControlNetConfig
from zimage_lite.models.dit import Block


class ControlBlock(Block):
    """A modulated block over c; `forward(c, x, ...)` -> (c, hint). x (the controlled stream) is given to
    the first block of a chain only, which alone has `before_proj`."""

    def __init__(self, cfg: ControlNetConfig, first: bool):
        super().__init__(cfg.block_config(), modulated=True)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, c, x, freqs, mask, adaln, chunks: int = 1):  # type: ignore[override]
        if x is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, freqs, mask, adaln, chunks)
        return c, self.after_proj(c)


class ZImageControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        self.control_x_embedder = nn.Linear(4 * cfg.control_in_dim, cfg.dim)  # patch 2 x 2
        self.control_layers = nn.ModuleList(ControlBlock(cfg, i == 0) for i in range(len(cfg.places)))
        if cfg.version == "v1":
            blocks = (Block(cfg.block_config(), modulated=True) for _ in range(cfg.n_refiner_blocks))
        else:
            blocks = (ControlBlock(cfg, i == 0) for i in range(cfg.n_refiner_blocks))
        self.control_noise_refiner = nn.ModuleList(blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.control_x_embedder.bias.dtype

    def refiner_chain(self) -> nn.ModuleList:
        """The blocks of the refiner stage (2.x): 2.0 runs its main blocks there."""
        return self.control_layers if self.config.version == "2.0" else self.control_noise_refiner


class HintChain:
    """Runs a chain of control blocks lazily along the stream it controls.

    `before(i, x)` is called with the stream's value before its layer i and returns the hint to add after
    that layer (None if layer i takes none); `finish()` runs the chain's remaining blocks, returns c."""

    def __init__(self, blocks, places, c, freqs, mask, adaln, scale: float, chunks: int = 1):
        self.todo = list(zip(places, blocks))
        self.rest = list(blocks)[len(places) :]
        self.c, self.first = c, True
        self.args = (freqs, mask, adaln, chunks)
        self.scale = scale

    def _step(self, block, x):
        self.c, hint = block(self.c, x if self.first else None, *self.args)
        self.first = False
        return hint

    def before(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        if not self.todo or self.todo[0][0] != i:
            return None
        _, block = self.todo.pop(0)
        return self._step(block, x) * self.scale

    def finish(self) -> torch.Tensor:
        for block in self.rest:
            self._step(block, None)
        self.rest = []
        return self.c


class ControlRun:
    """One transformer call's control: made by `ControlInput.start` from the DiT's sequences.

    The authors' semantics (VideoX-Fun, ComfyUI): refiner-stage hints go into the base model's noise
    refiner, so the main control blocks see the same joint sequence as the main layers. diffusers 0.42
    adds them only to the ControlNet's own copy of the image stream (README, "ControlNet")."""

    def __init__(self, net: ZImageControlNet, tokens, seq, adaln, pad_token, scale: float, chunks: int = 1):
        self.net, self.seq, self.adaln, self.scale, self.chunks = net, seq, adaln, scale, chunks
        c = net.control_x_embedder(tokens.to(net.dtype))  # (B, Ni_pad, 4*in) -> (B, Ni_pad, dim)
        self.c = torch.where(seq.image_pad[..., None], pad_token, c)
        self.chain: HintChain | None = None

    def refiner_hints(self) -> HintChain | None:
        """Hints for the noise-refiner layers (2.x), None for v1."""
        cfg = self.net.config
        if cfg.version == "v1":
            return None
        blocks = self.net.refiner_chain()
        self.chain = HintChain(
            blocks,
            cfg.refiner_places,
            self.c,
            self.seq.image_freqs,
            None,
            self.adaln,
            self.scale,
            self.chunks,
        )
        return self.chain

    def layer_hints(self, cap: torch.Tensor) -> HintChain:
        """Hints for the main layers; `cap` the refined caption tokens (B, Lmax, dim)."""
        if self.chain is not None:
            c = self.chain.finish()
        else:  # v1: plain refiner blocks over the control tokens alone
            c = self.c
            for block in self.net.control_noise_refiner:
                c = block(c, self.seq.image_freqs, None, self.adaln, self.chunks)
        self.c = self.chain = None
        places = self.net.config.places
        joint = self.seq.join(c, cap)
        return HintChain(
            self.net.control_layers, places, joint, self.seq.joint_freqs, self.seq.joint_mask, self.adaln,
            self.scale, self.chunks,
        )  # fmt: skip


def execution_order(dit: nn.Module, net: ZImageControlNet) -> list[nn.Module]:
    """The DiT's and the branch's blocks in the order one controlled forward runs them (each once: 2.0's
    main blocks also run in its refiner stage, and are listed where the main stage runs them)."""
    cfg = net.config
    order: list[nn.Module] = []
    chain = [] if cfg.version in ("v1", "2.0") else list(net.control_noise_refiner)
    refiner = dict(zip(cfg.refiner_places, chain))
    for i, block in enumerate(dit.noise_refiner):
        order += [refiner[i], block] if i in refiner else [block]
    order += list(dit.context_refiner)
    if cfg.version == "v1":
        order += list(net.control_noise_refiner)
    hints = dict(zip(cfg.places, net.control_layers))
    for i, block in enumerate(dit.layers):
        order += [hints[i], block] if i in hints else [block]
    return order


def live_hint_bytes(
    cfg: ControlNetConfig, tokens: int, batch: int, element: int, one_live: bool = True
) -> int:
    """Device bytes the branch adds to a forward over `tokens` joint tokens: the control stream c and the
    hints alive at once (one, as computed here; all of them if computed up front, as diffusers does)."""
    hints = 1 if one_live else len(cfg.places)
    return batch * (1 + hints) * tokens * cfg.dim * element
