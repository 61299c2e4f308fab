"""Images kept for `response_format=url`: files `<32 hex>.<ext>` under the output folder, written under a
temporary name and renamed when complete, served until they are `ttl_s` old, then deleted."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from pathlib import Path

NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp)$")
MEDIA = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


class FileStore:
    def __init__(self, root: Path, ttl_s: float, sweep_every_s: float = 60.0):
        self.root = root
        self.ttl_s = ttl_s
        self.sweep_every_s = sweep_every_s
        self._last_sweep = 0.0
        root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, ext: str) -> str:
        """Write `data`; returns the file's name (its id and extension)."""
        self.sweep()
        name = f"{secrets.token_hex(16)}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def path(self, name: str) -> Path | None:
        """The file for `name` if it is one of ours and still fresh (an expired one is deleted)."""
        if not NAME.match(name):
            return None
        path = self.root / name
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        return path

    def sweep(self, force: bool = False) -> int:
        """Delete expired files (at most once per `sweep_every_s` unless `force`); returns how many."""
        now = time.time()
        if not force and now - self._last_sweep < self.sweep_every_s:
            return 0
        self._last_sweep = now
        removed = 0
        for path in self.root.iterdir():
            if NAME.match(path.name) and self.path(path.name) is None:
                removed += 1
        return removed
