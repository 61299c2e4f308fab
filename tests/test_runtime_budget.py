"""`--vram` parsing and budget resolution (CPU; the CUDA branch needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from zimage_lite.errors import UsageError
from zimage_lite.runtime.budget import GIB, KIB, MIB, format_bytes, parse_vram, resolve_budget


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("4GB", 4 * GIB),
        ("6GiB", 6 * GIB),
        ("8gb", 8 * GIB),
        (" 8 G ", 8 * GIB),
        ("512MB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("5.5GB", int(5.5 * GIB)),
        (".5GB", GIB // 2),
        ("6", 6 * GIB),  # a bare number is GiB
        ("1024KB", MIB),
        ("1TB", 1 << 40),
        ("123b", 123),
        (3 * GIB, 3 * GIB),  # an int is bytes
        ("auto", None),
        ("AUTO", None),
        (None, None),
    ],
)
def test_parse_vram(spec, expected):
    assert parse_vram(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "GB", "four GB", "4 XB", "-4GB", "0GB", "4GB6", "1e9", "4..5GB", 0, -1, True]
)
def test_parse_vram_rejects_nonsense_with_one_line(spec):
    with pytest.raises(UsageError) as info:
        parse_vram(spec)
    assert "\n" not in str(info.value) and "VRAM budget" in str(info.value)


def test_format_bytes():
    assert format_bytes(int(3.14 * GIB)) == "3.1 GB"
    assert format_bytes(int(3.14 * GIB), 2) == "3.14 GB"
    assert format_bytes(512 * MIB) == "512 MB"
    assert format_bytes(3 * KIB) == "3 KB"
    assert format_bytes(12) == "12 B"


def test_resolve_budget_on_cpu():
    cpu = torch.device("cpu")
    b = resolve_budget("6GB", cpu)
    assert (b.total_bytes, b.context_bytes, b.source) == (6 * GIB, 0, "explicit")
    assert resolve_budget("auto", cpu).total_bytes is None  # nothing streams on the CPU unless asked
    with pytest.raises(UsageError):
        resolve_budget("lots", cpu)


@pytest.mark.gpu
def test_resolve_budget_on_cuda():
    dev = torch.device("cuda")
    auto = resolve_budget("auto", dev)
    free, total = torch.cuda.mem_get_info(dev)
    assert auto.context_bytes == 0 and 0 < auto.total_bytes <= free + torch.cuda.memory_reserved(dev)
    huge = resolve_budget("1000GB", dev)
    assert huge.total_bytes <= total + huge.context_bytes  # clamped to what the card has
