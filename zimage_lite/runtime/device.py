"""The small device layer the block streamer talks to: one interface, a CUDA and a CPU implementation.

    alloc(n)                     -> uint8 device buffer of n bytes (a ring slot, a resident block)
    host_buffer(n)               -> uint8 host buffer for the host store (pinned when possible)
    copy_async(dst, src, after)  -> CopyTicket: host -> device copy ordered after `after` (an event of
                                    the compute stream: "the slot's previous user is done")
    wait(ticket)                 the compute stream waits until the copy has landed
    record()                     -> an event on the compute stream (marks "slot free")
    fill(buf, byte)              fill a device buffer on the compute stream (poisoning in tests)
    synchronize(), timings()     drain everything; copy seconds, stall seconds, bytes, copies

CudaDevice: a side stream for copies, events between it and the compute (current) stream, pinned host
memory (page-locked, so copies are true DMA and overlap compute). When pinning fails or would take too
much of the host's RAM, host buffers stay pageable and each copy goes through one of two pinned
staging buffers (a host memcpy, then an async DMA), so the overlap survives without doubling RAM.
Copy time is measured by CUDA events on the copy stream; stall time is how long the compute stream sat
blocked in `wait` (an event before and after the wait), so hidden = copy - stall.

CpuDevice: the "device" is the CPU. Buffers are distinct storage from the host store (a wrong slot
mapping gives wrong numbers, which the tests rely on); copies are synchronous, events are immediate,
and nothing overlaps: stall == copy time.

The CPU layer keeps a `DeviceLedger`, the CPU's view of device memory: every buffer its `alloc`
hands out is backed by a numpy array whose finaliser runs when torch frees the storage, so the ledger's
live bytes are the bytes really still referenced (a parameter left pointing into a freed phase's
buffer keeps them live, as it would on a GPU), it knows which tensors live in device buffers
(`holds`), and a `capacity` makes an over-budget allocation fail as a capped card's allocator would.
On CUDA the allocator itself is the ledger (`memory_allocated`).

CudaDevice ran on an H200 (copies hidden behind compute, DESIGN.md §8); CI has no GPU, so its own
tests are marked `gpu` and the CPU layer carries the accounting tests.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zimage_lite.errors import DeviceMemoryError

log = logging.getLogger(__name__)

# Pin at most this fraction of the host's physical RAM: page-locked memory cannot be swapped out, and
# the OS, the text encoder's host copy and the user's other programs still need room.
DEFAULT_PIN_FRACTION = 0.5


@dataclass
class CopyTicket:
    """One issued host->device copy: `done` is the event (or None on the CPU) that marks it landed."""

    nbytes: int
    done: Any = None
    start: Any = None


@dataclass
class _Timings:
    h2d_bytes: int = 0
    copies: int = 0
    copy_s: float = 0.0
    stall_s: float = 0.0
    pending: list = field(default_factory=list)  # (kind, start_event, end_event) not yet resolved


def host_ram_bytes() -> int | None:
    """Physical RAM of this machine, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class DeviceLedger:
    """Live and peak bytes of device buffers (module docstring), plus named reservations: the planner's
    activation and scratch estimate for a phase is reserved while it runs, so `peak` is what the phase
    may take in all. `capacity` (bytes, None = unlimited) refuses what a capped card would refuse."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.live = 0
        self.peak = 0
        self._ranges: dict[int, tuple[int, int]] = {}  # key -> (address, nbytes) of live buffers
        self._next_key = 0

    def _grow(self, nbytes: int, what: str) -> None:
        if self.capacity is not None and self.live + nbytes > self.capacity:
            raise DeviceMemoryError(
                f"out of device memory: {what} needs {nbytes} bytes, {self.live} of {self.capacity} in use"
            )
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _shrink(self, key: int | None, nbytes: int) -> None:
        self.live -= nbytes
        if key is not None:
            self._ranges.pop(key, None)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of `nbytes`, counted until torch frees its storage."""
        self._grow(nbytes, "a buffer")
        array = np.empty(max(nbytes, 1), dtype=np.uint8)
        buf = torch.from_numpy(array)[:nbytes]
        key, self._next_key = self._next_key, self._next_key + 1
        self._ranges[key] = (array.ctypes.data, nbytes)
        weakref.finalize(array, self._shrink, key, nbytes)  # runs when the storage is freed
        return buf

    def reserve(self, nbytes: int, what: str) -> None:
        self._grow(nbytes, what)

    def release(self, nbytes: int) -> None:
        self._shrink(None, nbytes)

    def reset_peak(self) -> None:
        self.peak = self.live

    def holds(self, t: torch.Tensor) -> bool:
        """True when `t`'s memory lies inside a live buffer of this ledger (i.e. "on the device")."""
        if t.numel() == 0 or t.device.type != "cpu":
            return False
        start = t.data_ptr()
        return any(a <= start < a + n for a, n in self._ranges.values())


class CpuDevice:
    """Plain copies and immediate events on the CPU (module docstring); memory through `ledger`."""

    def __init__(self, ledger: DeviceLedger | None = None) -> None:
        self.device = torch.device("cpu")
        self.ledger = ledger or DeviceLedger()
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self._t = _Timings()

    def alloc(self, nbytes: int) -> torch.Tensor:
        return self.ledger.alloc(nbytes)

    def holds(self, t: torch.Tensor) -> bool:
        return self.ledger.holds(t)

    def allocated_bytes(self) -> int:
        return self.ledger.live

    def peak_bytes(self) -> int:
        return self.ledger.peak

    def reset_peak(self) -> None:
        self.ledger.reset_peak()

    def reserve(self, nbytes: int, what: str) -> None:
        self.ledger.reserve(nbytes, what)

    def release(self, nbytes: int) -> None:
        self.ledger.release(nbytes)

    def empty_cache(self) -> None:
        pass

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.pageable_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> CopyTicket:
        start = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - start
        self._t.h2d_bytes += src.nbytes
        self._t.copies += 1
        self._t.copy_s += elapsed
        self._t.stall_s += elapsed  # the copy ran on the compute thread: nothing was hidden
        return CopyTicket(src.nbytes)

    def wait(self, ticket: CopyTicket) -> None:
        pass

    def record(self) -> None:
        return None

    def fill(self, buf: torch.Tensor, byte: int) -> None:
        buf.fill_(byte)

    def synchronize(self) -> None:
        pass

    def timings(self) -> dict:
        t = self._t
        return {"h2d_bytes": t.h2d_bytes, "h2d_copies": t.copies, "copy_s": t.copy_s, "stall_s": t.stall_s}


class CudaDevice:
    """Side copy stream + events + pinned host store (module docstring). `pin`: "auto" pins while the
    pinned total stays under `pin_fraction` of host RAM; "never" keeps everything pageable."""

    def __init__(
        self,
        device: torch.device | str = "cuda",
        pin: str = "auto",
        pin_fraction: float = DEFAULT_PIN_FRACTION,
    ) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        ram = host_ram_bytes()
        self._pin_limit = 0 if pin == "never" else (int(ram * pin_fraction) if ram else 1 << 62)
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self._staging = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._staging_free: list[torch.cuda.Event | None] = [None, None]
        self._next_staging = 0
        self._t = _Timings()

    # -- memory ---------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def holds(self, t: torch.Tensor) -> bool:
        return t.device == self.device

    # the caching allocator is the ledger; reservations are the planner's, real tensors count themselves
    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def reserve(self, nbytes: int, what: str) -> None:
        pass

    def release(self, nbytes: int) -> None:
        pass

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        if self.pinned_bytes + nbytes <= self._pin_limit:
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned_bytes += nbytes
                return buf
            except RuntimeError as exc:  # cudaHostAlloc refused (locked-memory limit, RAM)
                log.warning(
                    "pinning %d bytes failed (%s): host store continues in pageable memory", nbytes, exc
                )
                self._pin_limit = 0
        self.pageable_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)

    def _staging_buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """(index, view) of one of two pinned staging buffers, once the DMA that last read it is done."""
        k = self._next_staging
        self._next_staging ^= 1
        if self._staging_free[k] is not None:
            self._staging_free[k].synchronize()  # host waits: the buffer is about to be overwritten
        if self._staging[k].numel() < nbytes:
            self.pinned_bytes += nbytes - self._staging[k].numel()
            self._staging[k] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return k, self._staging[k][:nbytes]

    # -- ordering -------------------------------------------------------------------------------------
    def copy_async(
        self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None
    ) -> CopyTicket:
        staged, k = None, 0
        if not src.is_pinned():
            k, staged = self._staging_buffer(src.nbytes)
            staged.copy_(src)  # host memcpy on this thread while the GPU runs earlier work
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)  # the slot's previous block has finished computing
            start.record(self.copy_stream)
            dst.copy_(staged if staged is not None else src, non_blocking=True)
            done.record(self.copy_stream)
        if staged is not None:
            self._staging_free[k] = done
        # dst was allocated on the compute stream and is now written on the copy stream: tell the
        # caching allocator, so a free of dst cannot hand its memory out while the copy still runs.
        dst.record_stream(self.copy_stream)
        self._t.h2d_bytes += src.nbytes
        self._t.copies += 1
        self._t.pending.append(("copy", start, done))
        return CopyTicket(src.nbytes, done, start)

    def wait(self, ticket: CopyTicket) -> None:
        stream = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(ticket.done)
        after.record(stream)
        self._t.pending.append(("stall", before, after))
        if len(self._t.pending) > 1024:
            self._resolve(only_finished=True)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def fill(self, buf: torch.Tensor, byte: int) -> None:
        buf.fill_(byte)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    # -- stats ----------------------------------------------------------------------------------------
    def _resolve(self, only_finished: bool = False) -> None:
        keep = []
        for kind, a, b in self._t.pending:
            if only_finished and not b.query():
                keep.append((kind, a, b))
                continue
            seconds = a.elapsed_time(b) / 1000.0
            if kind == "copy":
                self._t.copy_s += seconds
            else:
                self._t.stall_s += seconds
        self._t.pending = keep

    def timings(self) -> dict:
        self.synchronize()
        self._resolve()
        t = self._t
        return {"h2d_bytes": t.h2d_bytes, "h2d_copies": t.copies, "copy_s": t.copy_s, "stall_s": t.stall_s}


def device_layer_for(
    device: torch.device | str, ledger: DeviceLedger | None = None, **kwargs
) -> CpuDevice | CudaDevice:
    """CudaDevice for a CUDA device, CpuDevice (with `ledger`) otherwise."""
    device = torch.device(device)
    return CudaDevice(device, **kwargs) if device.type == "cuda" else CpuDevice(ledger)
