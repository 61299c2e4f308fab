"""What a warm server keeps across requests, as parts the Pipeline composes (its `text_features` and
`plan_phases` slots): prompt features in an LRU keyed by token ids, plans per size, LoRA files read once.

Each part counts its hits and misses (`hits`, `misses`) for /metrics.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from zimage_lite.serve.params import LoraChoice

log = logging.getLogger(__name__)

PLAN_TOKEN_BUCKET = 64  # captions are planned for a multiple of this many tokens, so prompts share plans


class PromptFeatureCache:
    """`text_features(ids)` with an LRU of each prompt's features (kept in host memory: the device
    budget stays the plan's). A hit skips the text-encoder phase: its weights are not even placed."""

    def __init__(
        self, encode: Callable[[list[list[int]]], list[torch.Tensor]], size: int, device: torch.device
    ):
        self.encode = encode
        self.size = size
        self.device = device
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, ids: list[list[int]]) -> list[torch.Tensor]:
        keys = [tuple(row) for row in ids]
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            for key, feats in zip(missing, self.encode([list(k) for k in missing])):
                self.entries[key] = feats.detach().cpu()
        out = []
        for key in keys:
            self.entries.move_to_end(key)
            out.append(self.entries[key].to(self.device))
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out


class PlanCache:
    """`plan_phases` memoized by size, image count, caption length (rounded up to PLAN_TOKEN_BUCKET:
    an upper bound plans safely) and encode; `clear()` when the models' tensors change (a LoRA switch)."""

    def __init__(self, plan: Callable[..., object]):
        self.plan = plan
        self.plans: dict[tuple, object] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, *models, caption_tokens: int, **kw) -> object:
        tokens = min(512, -(-caption_tokens // PLAN_TOKEN_BUCKET) * PLAN_TOKEN_BUCKET)
        key = (tokens, *sorted((k, str(v)) for k, v in kw.items()))
        if key in self.plans:
            self.hits += 1
            return self.plans[key]
        self.misses += 1
        plans = self.plans[key] = self.plan(*models, caption_tokens=tokens, **kw)
        return plans

    def clear(self) -> None:
        self.plans.clear()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,199}$")


class LoraLibrary:
    """LoRAs by name: the `*.safetensors` files directly in `folder` (the name is the file stem; no
    request ever gives a path). Each file is read once; `select` switches the set on the pipeline."""

    def __init__(self, folder: Path | None, read: Callable[[Path], dict]):
        self.folder = folder
        self.read = read
        self.updates: dict[str, dict] = {}
        self.current: tuple[LoraChoice, ...] = ()
        self.hits = 0
        self.misses = 0

    def names(self) -> set[str]:
        if self.folder is None:
            return set()
        return {p.stem for p in self.folder.glob("*.safetensors") if p.is_file() and _NAME.match(p.stem)}

    def _updates(self, name: str) -> dict:
        if name in self.updates:
            self.hits += 1
            return self.updates[name]
        if name not in self.names():  # schemas checked it; the folder may have changed since
            from zimage_lite.errors import UsageError

            raise UsageError(f"no LoRA named {name!r} in the LoRA folder")
        self.misses += 1
        updates = self.updates[name] = self.read(self.folder / f"{name}.safetensors")
        return updates

    def select(self, choices: Sequence[LoraChoice], apply: Callable[[list], int]) -> bool:
        """Make `choices` the active set through `apply` (Pipeline.set_loras); True when it changed."""
        choices = tuple(choices)
        if choices == self.current:
            return False
        loras = [(c.name, self._updates(c.name), c.scale) for c in choices]
        self.current = ()  # a failure below leaves the state unknown: the next request re-applies
        apply(loras)
        self.current = choices
        return True
