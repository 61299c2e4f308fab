"""The path chooser (kernels/choice.py) with a fake clock: it picks the faster candidate, remembers the
answer in memory and on disk, and falls back to dequant + cuBLAS whenever it cannot tell."""

from __future__ import annotations

import json

import pytest
import torch

from zimage_lite.kernels import choice, dispatch
from zimage_lite.kernels.choice import PathChooser, Problem

CPU = torch.device("cpu")
PROBLEM = Problem("Q4_K", 11520, 3840, 1)


class FakeClock:
    """Seconds per candidate name; a candidate is a function returning its own name."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds = seconds
        self.timed: list[str] = []

    def __call__(self, fn, device) -> float:
        name = fn()
        self.timed.append(name)
        return self.seconds[name]


def candidates(*names: str) -> dict:
    return {name: (lambda name=name: name) for name in names}


def make(clock, tmp_path=None, label="GPU A") -> PathChooser:
    path = None if tmp_path is None else tmp_path / "choices.json"
    return PathChooser(timer=clock, path=path, measured_on=("cpu",), label=lambda device: label)


@pytest.fixture(autouse=True)
def _own_chooser(monkeypatch):
    monkeypatch.delenv("ZIMAGE_LITE_KERNEL_TUNING", raising=False)
    old = choice.set_chooser(None)
    yield
    choice.set_chooser(old)


@pytest.mark.parametrize(
    ("seconds", "best"),
    [({"dequant": 30e-6, "gemv": 6e-6}, "gemv"), ({"dequant": 30e-6, "gemv": 130e-6}, "dequant")],
)
def test_picks_the_faster_candidate(seconds, best):
    clock = FakeClock(seconds)
    assert make(clock).choose(CPU, PROBLEM, candidates("dequant", "gemv")) == best
    assert sorted(clock.timed) == ["dequant", "gemv"]


def test_the_default_wins_a_tie():
    clock = FakeClock({"dequant": 5e-6, "gemv": 5e-6})
    assert make(clock).choose(CPU, PROBLEM, candidates("gemv", "dequant")) == "dequant"


def test_a_single_candidate_is_not_timed():
    clock = FakeClock({})
    assert make(clock).choose(CPU, PROBLEM, candidates("dequant")) == "dequant"
    assert clock.timed == []


def test_remembers_in_memory_and_on_disk(tmp_path):
    clock = FakeClock({"dequant": 30e-6, "gemv": 6e-6})
    first = make(clock, tmp_path)
    assert first.choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "gemv"
    assert first.choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "gemv"
    assert len(clock.timed) == 2  # timed once
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert saved == {"GPU A": {"Q4_K 11520x3840 m<=1": "gemv"}}

    later = make(FakeClock({}), tmp_path)  # a new process: the file answers, nothing is timed
    assert later.known(CPU, PROBLEM) == "gemv"
    assert later.choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "gemv"


def test_each_device_label_and_problem_is_its_own_measurement(tmp_path):
    make(FakeClock({"dequant": 1.0, "gemv": 0.5}), tmp_path, "GPU A").choose(
        CPU, PROBLEM, candidates("dequant", "gemv")
    )
    other_gpu = FakeClock({"dequant": 0.5, "gemv": 1.0})
    assert make(other_gpu, tmp_path, "GPU B").choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "dequant"
    other_m = Problem("Q4_K", 11520, 3840, 16)
    clock = FakeClock({"dequant": 0.5, "gemv": 1.0})
    assert make(clock, tmp_path, "GPU A").choose(CPU, other_m, candidates("dequant", "gemv")) == "dequant"
    saved = json.loads((tmp_path / "choices.json").read_text())
    assert saved == {
        "GPU A": {"Q4_K 11520x3840 m<=1": "gemv", "Q4_K 11520x3840 m<=16": "dequant"},
        "GPU B": {"Q4_K 11520x3840 m<=1": "dequant"},
    }


def test_a_failing_candidate_is_not_chosen(tmp_path):
    def broken():
        raise RuntimeError("out of resources")

    clock = FakeClock({"dequant": 30e-6})
    chooser = make(clock, tmp_path)
    assert chooser.choose(CPU, PROBLEM, {"gemv": broken, "dequant": lambda: "dequant"}) == "dequant"
    assert chooser.choose(CPU, PROBLEM, {"gemv": broken, "dequant": lambda: "dequant"}) == "dequant"
    assert clock.timed == ["dequant"]  # remembered for this process...
    assert not (tmp_path / "choices.json").exists()  # ...but not on disk: the failure may pass
    # nothing ran: the default
    assert make(clock).choose(CPU, PROBLEM, {"gemv": broken, "dequant": broken}) == "dequant"


@pytest.mark.parametrize("why", ["device not measured", "tuning off"])
def test_falls_back_to_dequant_without_timing(why, monkeypatch):
    clock = FakeClock({"dequant": 1.0, "gemv": 0.5})
    chooser = make(clock)
    if why == "tuning off":
        monkeypatch.setenv("ZIMAGE_LITE_KERNEL_TUNING", "0")
    else:
        chooser.measured_on = ("cuda",)
    assert chooser.choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "dequant"
    assert clock.timed == []


def test_an_unreadable_cache_is_ignored_and_replaced(tmp_path):
    (tmp_path / "choices.json").write_text("{not json")
    chooser = make(FakeClock({"dequant": 1.0, "gemv": 0.5}), tmp_path)
    assert chooser.choose(CPU, PROBLEM, candidates("dequant", "gemv")) == "gemv"
    assert json.loads((tmp_path / "choices.json").read_text()) == {"GPU A": {PROBLEM.key(): "gemv"}}


def test_a_remembered_path_that_cannot_run_here_is_not_used(tmp_path):
    (tmp_path / "choices.json").write_text(json.dumps({"GPU A": {PROBLEM.key(): "gemv"}}))
    clock = FakeClock({"dequant": 1.0, "torch": 2.0})
    assert make(clock, tmp_path).choose(CPU, PROBLEM, candidates("dequant", "torch")) == "dequant"


def test_m_buckets():
    assert [choice.m_bucket(m) for m in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]


def test_cache_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIMAGE_LITE_CACHE_DIR", str(tmp_path / "z"))
    assert choice.cache_file() == tmp_path / "z" / "kernel-choices.json"
    monkeypatch.delenv("ZIMAGE_LITE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert choice.cache_file() == tmp_path / "xdg" / "zimage-lite" / "kernel-choices.json"


def test_device_label_names_the_versions():
    label = choice.device_label(CPU)
    assert label.startswith("cpu | torch ") and torch.__version__ in label and "triton" in label


def test_event_timer_runs_warmup_and_repeats_on_the_cpu():
    calls = []
    seconds = choice.event_timer(lambda: calls.append(1), CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and seconds >= 0


@pytest.mark.interpreter
def test_quant_matmul_uses_the_measured_path(tmp_path):
    """Through dispatch: the candidates are really run paths; the faster one (by the fake clock) is
    used, remembered, and reported by select_path; M > 16 has one candidate and is never timed."""
    from zimage_lite.quant import formats

    timed = []

    def clock(fn, device):
        fn()  # the candidate really runs
        timed.append(fn.args[0])
        return {"dequant": 2.0, "gemv": 1.0}[fn.args[0]]

    choice.set_chooser(make(clock, tmp_path))
    w = torch.randn(24, 256) * 0.02
    raw = formats.quantize(w, "Q8_0")
    weight = dispatch.QuantWeight(raw, "Q8_0", (24, 256))
    x = torch.randn(2, 256)
    assert dispatch.select_path(2, "Q8_0", CPU, "triton", (24, 256)) == "dequant"  # nothing known yet
    y = dispatch.quant_matmul(x, weight, backend="triton")
    assert sorted(timed) == ["dequant", "gemv"]
    assert dispatch.select_path(2, "Q8_0", CPU, "triton", (24, 256)) == "gemv"
    torch.testing.assert_close(y, x @ formats.dequantize(raw, "Q8_0", (24, 256)).T)
    dispatch.quant_matmul(torch.randn(1, 2, 256), weight, backend="triton")  # same M bucket: no timing
    dispatch.quant_matmul(torch.randn(17, 256), weight, backend="triton")  # one candidate: no timing
    assert len(timed) == 2
