"""The published Z-Image-Turbo configs (`transformer/config.json`, `scheduler/scheduler_config.json`),
copied unchanged from the shared reference configs (tests/data/README.md gives their source and sha256).

The synthetic models take their configs from these files, so a drifted default in config.py (a shift,
a rope_theta) makes the synthetic model and our defaults disagree, which the tests see.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

NAMES = ("transformer", "scheduler")


def published_config(name: str) -> dict[str, Any]:
    """The published config.json values of `name` ("transformer" or "scheduler"), `_class_name` included."""
    if name not in NAMES:
        raise ValueError(f"no published config {name!r}; have {', '.join(NAMES)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))
