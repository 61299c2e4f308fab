"""Our configs against the published Z-Image-Turbo ones (tests/data/reference-configs, see its README).

The defaults in config.py are what single files and GGUFs load with (they carry no config.json), and the
synthetic models are written from the published files: a drifted default (the scheduler's shift, the
DiT's rope_theta) must fail here, not pass because both sides of a parity test read the same constant.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from zimage_lite.config import DiTConfig, SchedulerConfig
from zimage_lite.sampling import model_time, turbo_sigmas
from zimage_lite.synthetic import SIZES, write_synthetic_model
from zimage_lite.weights.names_dit import dit_key_plan, dit_shapes

DATA = Path(__file__).parent / "data" / "reference-configs"
PACKAGE = Path(__file__).parent.parent / "zimage_lite" / "published"
SIZE_FIELDS = {"dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim", "axes_dims"}


def published(name: str) -> dict:
    values = json.loads((DATA / f"{name}.json").read_text())
    values.pop("_class_name")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("fixed")}


def assert_fields_equal(ours: dict, theirs: dict, what: str) -> None:
    assert set(ours) == set(theirs), f"{what}: keys differ"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong, f"{what} differs from the published config (ours, published): {wrong}"


@pytest.mark.parametrize("name", ["transformer", "scheduler"])
def test_the_package_copies_are_the_vendored_files(name):
    assert (PACKAGE / f"{name}.json").read_bytes() == (DATA / f"{name}.json").read_bytes()


def test_config_inferred_from_the_real_shapes_is_the_published_one():
    """diffusers builds the real-size transformer from transformer.json on the meta device; the config we
    infer from its tensor shapes (what a single file or GGUF loads with) equals transformer.json."""
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(json.loads((DATA / "transformer.json").read_text()))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    class Shapes:
        def shape(self, key):
            return shapes[key]

    inferred = DiTConfig.from_shapes(dit_shapes(Shapes(), dit_key_plan(shapes)))
    assert_fields_equal(fields(inferred), published("transformer"), "inferred transformer config")


def test_defaults_are_the_published_configs():
    assert_fields_equal(fields(DiTConfig()), published("transformer"), "DiTConfig()")
    assert_fields_equal(fields(SchedulerConfig()), published("scheduler"), "SchedulerConfig()")


@pytest.mark.parametrize("steps", [1, 4, 8, 9, 50])
def test_sigmas_equal_diffusers_scheduler_from_the_published_config(steps):
    """FlowMatchEulerDiscreteScheduler from scheduler.json, driven as ZImagePipeline drives it."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(json.loads((DATA / "scheduler.json").read_text()))
    seq_len = (1024 // 16) ** 2  # a 1024x1024 image; mu only matters under dynamic shifting
    mu = calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))  # fmt: skip
    timesteps, n = retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    assert n == steps
    ours = turbo_sigmas(steps)
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(model_time(ours[:-1]), (1000 - timesteps) / 1000)  # the transformer's t input


@pytest.mark.parametrize("size", list(SIZES))
def test_synthetic_transformers_are_the_published_one_resized(size):
    """Only sizes differ from transformer.json (full: nothing), so rope_theta & co. are the real ones."""
    ours, theirs = fields(SIZES[size]().dit), published("transformer")
    if size == "full":
        assert_fields_equal(ours, theirs, "full synthetic transformer")
    keep = set(theirs) - SIZE_FIELDS
    assert_fields_equal({k: ours[k] for k in keep}, {k: theirs[k] for k in keep}, f"{size} synthetic")


def test_synthetic_folder_carries_the_published_scheduler(tmp_path):
    root = write_synthetic_model(tmp_path / "tiny", "tiny")
    written = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert written == json.loads((DATA / "scheduler.json").read_text())
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    theirs = json.loads((DATA / "transformer.json").read_text())
    assert {k: transformer[k] for k in theirs if k not in SIZE_FIELDS} == {
        k: v for k, v in theirs.items() if k not in SIZE_FIELDS
    }
