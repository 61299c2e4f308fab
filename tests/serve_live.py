"""A live `zimage-lite serve` for tests: its own process on 127.0.0.1 and a free port, waited for with a
bounded loop, stopped by its pid (SIGTERM, then SIGKILL after a bound)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def live_server(model: Path, tmp: Path, *args: str, ready_s: float = 120.0, env: dict | None = None):
    """`zimage-lite serve --model model --device cpu` plus `args` (and `env`); yields a Live once /ready
    is 200."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "zimage_lite.cli", "serve", "--model", str(model), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    # One torch thread: on a loaded 2-core machine OpenMP's spinning pool made tiny images 50x slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    live = Live(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{live.output()}")
            try:
                if httpx.get(f"{live.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {ready_s} s:\n{live.output()}")
            time.sleep(0.1)
        yield live
    finally:
        if proc.poll() is None:
            live.stop()


def write_lora(transformer: torch.nn.Module, path: Path, targets: tuple[str, ...], seed: int) -> Path:
    """A rank-4 LoRA in PEFT's layout on `transformer`'s linears ending with `targets` (our module names
    are diffusers'), random values of scale 0.3."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(targets):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=gen) * 0.3
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=gen) * 0.3
    save_file(tensors, str(path))
    return path
