"""The reuse parts a server puts into the Pipeline's slots (serve/reuse.py), in-process on the tiny
model: same images as a plain Pipeline, and the work they skip really is skipped."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serve_live import write_lora
from zimage_lite.pipeline import Pipeline
from zimage_lite.serve.config import ServeConfig
from zimage_lite.serve.engine import Engine
from zimage_lite.serve.params import JobParams, LoraChoice
from zimage_lite.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    transformer = Pipeline.load(tiny, device="cpu").transformer
    write_lora(transformer, folder / "style.safetensors", ("attention.to_q", "feed_forward.w2"), seed=3)
    return folder


def _run(engine: Engine, prompt: str, **kw) -> np.ndarray:
    p = JobParams(prompt, 32, 32, seed=kw.pop("seed", 1), steps=2, **kw)
    return np.asarray(engine.run(p, lambda *a: None)[0])


def test_a_repeated_prompt_skips_the_text_encoder_and_changes_nothing(tiny):
    plain = Pipeline.load(tiny, device="cpu")
    engine = Engine.around(Pipeline.load(tiny, device="cpu"), ServeConfig(prompt_cache_size=2))
    want = np.asarray(plain.generate("a harbour", seed=1, steps=2, width=32, height=32)[0])
    first = _run(engine, "a harbour")
    assert "text_encoder" in engine.stats().device_memory and engine.features.misses == 1
    second = _run(engine, "a harbour")
    assert "text_encoder" not in engine.stats().device_memory  # its weights were not even placed
    assert engine.features.hits == 1
    assert np.array_equal(first, want) and np.array_equal(second, want)
    for prompt in ("b", "c", "d"):  # the LRU holds 2
        _run(engine, prompt)
    assert len(engine.features.entries) == 2 and engine.features.misses == 4


def test_plans_are_kept_per_size_and_dropped_on_a_lora_switch(tiny, lora_dir):
    engine = Engine.around(Pipeline.load(tiny, device="cpu"), ServeConfig(lora_dir=lora_dir))
    _run(engine, "one")
    _run(engine, "two, a little longer")  # same size, caption within the same 64-token bucket
    assert (engine.plans.misses, engine.plans.hits) == (1, 1)
    _run(engine, "one", loras=(LoraChoice("style", 1.0),))
    assert engine.plans.misses == 2  # the LoRA's buffers count in the transformer's plan


def test_loras_are_read_once_and_switched_without_a_reload(tiny, lora_dir):
    reads = []
    engine = Engine.around(Pipeline.load(tiny, device="cpu"), ServeConfig(lora_dir=lora_dir))
    read = engine.loras.read
    engine.loras.read = lambda path: reads.append(path) or read(path)
    styled = [_run(engine, "a tree", loras=(LoraChoice("style", 0.5),)) for _ in range(2)]
    plain = _run(engine, "a tree")
    again = _run(engine, "a tree", loras=(LoraChoice("style", 0.5),))
    assert len(reads) == 1
    reference = Pipeline.load(tiny, device="cpu")
    reference.load_lora(lora_dir / "style.safetensors", 0.5)
    want = np.asarray(reference.generate("a tree", seed=1, steps=2, width=32, height=32)[0])
    assert all(np.array_equal(x, want) for x in (*styled, again))
    assert not np.array_equal(plain, want)
