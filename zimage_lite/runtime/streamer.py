"""Block streamer: run a model whose blocks do not all fit on the device, without touching model code.

A block is any nn.Module (a DiT block, a Qwen3 layer) taken as the set of its parameters and buffers,
whatever their dtypes (QuantLinear's raw uint8 / float8 weights included). `attach()`:
- resident blocks (per the Plan) are copied once into one device buffer each;
- streamed blocks get one host buffer each (the host store, pinned when the device layer can), their
  tensors are copied in and the parameters re-pointed at it, so the loaded originals (often views of
  the mmapped checkpoint) are released: weights live once in host RAM and are never re-read from disk;
- `ring_slots` device buffers of `slot_bytes` are allocated once; each tensor is an ALIGN-aligned view
  at the same offset in whichever slot its block occupies (planner.packed_layout), so nothing is
  allocated per step;
- a forward pre-hook on each streamed block waits for its copy and points its parameters at the slot;
  a forward hook points them back at the host store, marks the slot free (an event on the compute
  stream) and issues the copy of the block `ring_slots` positions later into that slot, on the copy
  stream, after that event. So while block i computes, blocks i+1..i+depth are being copied. The order
  is cyclic: the last block of a step prefetches the first blocks of the next step.
A block called out of the planned order is still correct: the streamer drains the ring, loads it
synchronously and restarts the prefetch from there (counted as `prefetch_misses`).

`fixed` tensors (a model's weights outside its blocks: embedders, final layer, a whole VAE decoder)
are packed into one more device buffer on attach, like a resident block.

`detach()` removes the hooks and points every tensor back at host memory (resident blocks and fixed
tensors at their original host tensors), so the ring, the resident buffers and the fixed buffer are
freed: nothing of the phase stays on the device. A detached streamer can be re-planned and attached
again; the host store built the first time is reused.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zimage_lite.runtime.planner import Plan, block_tensors, packed_layout

log = logging.getLogger(__name__)

POISON_BYTE = 0xFF  # NaN in every float format we store; fills a slot after use when poisoning


@dataclass(frozen=True)
class _Tensor:
    """One tensor of a block: where it is attached and where it lives in a packed buffer."""

    module: nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


TensorRef = tuple[nn.Module, str, torch.Tensor]  # (owner module, attribute name, tensor)


class _Block:
    def __init__(self, found: Sequence[TensorRef]):
        offsets, self.nbytes = packed_layout([t.nbytes for _, _, t in found])
        self.tensors = [
            _Tensor(m, name, name in m._parameters, t.dtype, tuple(t.shape), off, t.nbytes)
            for (m, name, t), off in zip(found, offsets)
        ]
        # Resident blocks return to these on detach. Plain tensors, not the Parameters: binding sets a
        # Parameter's .data to the device buffer, and a kept Parameter would then point there too.
        self.originals = [t.detach() for _, _, t in found]
        self.host: torch.Tensor | None = None  # streamed: the host-store buffer
        self.device_buf: torch.Tensor | None = None  # resident: the device buffer

    def bind(self, buf: torch.Tensor) -> None:
        """Point every tensor at its view in the packed buffer `buf` (host store, slot or device)."""
        for t in self.tensors:
            view = buf[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
            self._set(t, view)

    def bind_originals(self) -> None:
        for t, original in zip(self.tensors, self.originals):
            self._set(t, original)

    @staticmethod
    def _set(t: _Tensor, value: torch.Tensor) -> None:
        if t.is_param:
            t.module._parameters[t.name].data = value
        else:
            t.module._buffers[t.name] = value

    def pack_into(self, buf: torch.Tensor) -> None:
        """Copy the block's current tensors, byte for byte, into `buf` at their offsets."""
        for t, current in zip(self.tensors, self._current()):
            buf[t.offset : t.offset + t.nbytes].copy_(_as_bytes(current))

    def _current(self) -> list[torch.Tensor]:
        return [
            t.module._parameters[t.name] if t.is_param else t.module._buffers[t.name] for t in self.tensors
        ]


class BlockStreamer:
    """Streams `blocks` (execution order, as planned) through a ring of device slots (module docstring).

    Use as `with BlockStreamer(blocks, plan, device_layer): model(...)`, or attach()/detach().
    `fixed`: tensors outside the blocks, on the device while attached (module docstring).
    `poison_after_use` fills each slot with NaN bytes after its block ran (tests: a stale or wrong slot
    then shows up as NaN). `cyclic` prefetches the first blocks of the next call after the last block.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        plan: Plan,
        device_layer,
        *,
        fixed: Sequence[TensorRef] = (),
        cyclic: bool = True,
        poison_after_use: bool = False,
    ) -> None:
        self.modules = list(blocks)
        self.plan = plan
        self.layer = device_layer
        self.cyclic = cyclic
        self.poison_after_use = poison_after_use
        self._check_plan(plan)
        self._fixed = _Block(fixed) if fixed else None
        self._blocks: list[_Block] = []
        self._hooks: list = []
        self._slots: list[torch.Tensor] = []
        self._attached = False
        self._misses = 0
        self._resident_load_bytes = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    def _check_plan(self, plan: Plan) -> None:
        if len(self.modules) != len(plan.block_bytes):
            raise ValueError(f"plan is for {len(plan.block_bytes)} blocks, got {len(self.modules)}")

    def replan(self, plan: Plan) -> None:
        """Use `plan` from the next attach on (detached only)."""
        if self._attached:
            raise RuntimeError("replan() needs a detached streamer")
        self._check_plan(plan)
        self.plan = plan

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> BlockStreamer:
        if self._attached:
            return self
        if not self._blocks:  # a re-attach keeps the host store built the first time
            self._blocks = [_Block(block_tensors(m)) for m in self.modules]
        for i, (b, planned) in enumerate(zip(self._blocks, self.plan.block_bytes)):
            if b.nbytes != planned:
                raise ValueError(f"block {i} packs to {b.nbytes} bytes, the plan says {planned}")
        if self._fixed is not None:
            self._make_resident(self._fixed)
        for i in self.plan.resident:
            self._make_resident(self._blocks[i])
        for i in self.plan.streamed:
            self._make_host_store(self._blocks[i])
        self._slots = [self.layer.alloc(self.plan.slot_bytes) for _ in range(self.plan.ring_slots)]
        self._slot_block: list[int | None] = [None] * len(self._slots)
        self._slot_ticket: list = [None] * len(self._slots)
        self._slot_free: list = [None] * len(self._slots)
        self._where: dict[int, int] = {}
        self._order = list(self.plan.streamed)
        self._pos = {b: j for j, b in enumerate(self._order)}
        for i in self._order:
            m = self.modules[i]
            self._hooks.append(m.register_forward_pre_hook(functools.partial(self._before, i)))
            self._hooks.append(m.register_forward_hook(functools.partial(self._after, i)))
        self._attached = True
        if self._order:
            self._prime(0)
        log.info("streamer attached: %s", self.plan.summary())
        return self

    def detach(self) -> None:
        if not self._attached:
            return
        self.layer.synchronize()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for b in [*self._blocks, *([self._fixed] if self._fixed is not None else [])]:
            if b.host is not None:
                b.bind(b.host)
            else:
                b.bind_originals()
            b.device_buf = None
        self._slots = []
        self._where = {}
        self._attached = False

    def __enter__(self) -> BlockStreamer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_resident(self, b: _Block) -> None:
        b.device_buf = self.layer.alloc(b.nbytes)
        b.pack_into(b.device_buf)  # one-time copy (synchronous from pageable memory on CUDA)
        self._resident_load_bytes += b.nbytes
        b.bind(b.device_buf)

    def _make_host_store(self, b: _Block) -> None:
        if b.host is None:  # built once; a re-attach reuses it
            b.host = self.layer.host_buffer(b.nbytes)
            b.pack_into(b.host)
            b.originals = []  # the loaded tensors are released once nothing points at them
        b.bind(b.host)

    # -- ring -----------------------------------------------------------------------------------------
    def _load(self, j: int, slot: int) -> None:
        """Copy the j-th streamed block (cyclic position) into `slot` once the slot's last user is done."""
        n = len(self._order)
        i = self._order[j % n]
        self._next = (j + 1) % n if self.cyclic else j + 1
        if i in self._where:  # only when there are no more streamed blocks than slots
            return
        b = self._blocks[i]
        dst = self._slots[slot][: b.nbytes]
        self._slot_ticket[slot] = self.layer.copy_async(dst, b.host, after=self._slot_free[slot])
        self._slot_block[slot] = i
        self._where[i] = slot

    def _prime(self, j: int) -> None:
        """Empty the ring and fill it with the streamed blocks from position j on."""
        self._where.clear()
        self._slot_block = [None] * len(self._slots)
        self._next = j
        for slot in range(min(len(self._slots), len(self._order))):
            if not self.cyclic and self._next >= len(self._order):
                break
            self._load(self._next, slot)

    def _before(self, i: int, module: nn.Module, args) -> None:
        if i not in self._where:  # called out of the planned order: restart the prefetch from here
            self._misses += 1
            self.layer.synchronize()
            self._prime(self._pos[i])
        slot = self._where[i]
        self.layer.wait(self._slot_ticket[slot])
        self._blocks[i].bind(self._slots[slot])

    def _after(self, i: int, module: nn.Module, args, output) -> None:
        slot = self._where.pop(i)
        b = self._blocks[i]
        b.bind(b.host)
        if self.poison_after_use:
            self.layer.fill(self._slots[slot], POISON_BYTE)
        self._slot_free[slot] = self.layer.record()
        self._slot_block[slot] = None
        if self.cyclic or self._next < len(self._order):
            self._load(self._next, slot)

    # -- stats ----------------------------------------------------------------------------------------
    def device_weight_bytes(self) -> int:
        """Device bytes held for weights: fixed and resident buffers plus the ring."""
        held = [*self._blocks, *([self._fixed] if self._fixed is not None else [])]
        resident = sum(b.device_buf.numel() for b in held if b.device_buf is not None)
        return resident + sum(s.numel() for s in self._slots)

    def _host_store_bytes(self, pinned: bool) -> int:
        """This streamer's host store (the layer is shared by every phase of a pipeline), pinned or not."""
        return sum(
            b.host.numel() for b in self._blocks if b.host is not None and b.host.is_pinned() == pinned
        )

    def stats(self) -> dict:
        """Counts, bytes and seconds as plain JSON values; `overlap_fraction` = hidden copy time / copy
        time (None before any copy). On the CPU nothing overlaps (0.0)."""
        t = self.layer.timings()
        hidden = max(t["copy_s"] - t["stall_s"], 0.0)
        return {
            "resident_blocks": len(self.plan.resident),
            "streamed_blocks": len(self.plan.streamed),
            "ring_slots": self.plan.ring_slots,
            "slot_bytes": self.plan.slot_bytes,
            "device_weight_bytes": self.device_weight_bytes(),
            "resident_load_bytes": self._resident_load_bytes,
            "pinned_host_bytes": self._host_store_bytes(pinned=True),
            "pageable_host_bytes": self._host_store_bytes(pinned=False),
            **t,
            "hidden_copy_s": hidden,
            "overlap_fraction": hidden / t["copy_s"] if t["copy_s"] > 0 else None,
            "prefetch_misses": self._misses,
        }
