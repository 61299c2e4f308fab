"""The meta device as a stand-in for CUDA in CPU tests.

A tensor made without `device=` (a position table, a mask, a scratch buffer) lands on the CPU; on a GPU the
first op that mixes it with the model's tensors fails. CPU tests cannot see that, as every tensor is on the
CPU. The meta device can: it refuses to mix with CPU tensors just as CUDA does, and computes shapes and
dtypes without data. Code that reads a value (is every number finite? does any block tie?) gets its answer
from `MetaScalars`, as the meta device has no data to give one."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

META = torch.device("meta")


class MetaScalars(TorchDispatchMode):
    """Every scalar read of a meta tensor is true (all values finite, some block tied) and a mask selects
    every row, so the rare paths behind such reads run on the device too."""

    def __enter__(self):
        self._all_rows = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)
        self._all_rows.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._all_rows.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == META:
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))
