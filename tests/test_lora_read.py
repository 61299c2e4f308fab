"""`read_lora` on its own: every way a LoRA file can be wrong gets its own one-line message naming the file
and the tensor; where a file names one layer twice the diffusers-named pair wins, whatever the order of
the keys; every accepted spelling of a split q/k/v layer lands in the same third of our fused qkv.

Mutation testing (tools/mutate.py, slice "lora") showed these as the gaps of test_lora.py: messages that
named no file, a precedence rule that could be reversed, a key spelling that could be dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zimage_lite.errors import CheckpointError
from zimage_lite.pipeline import Pipeline
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.lora import read_lora

DIM, HIDDEN = 64, 170  # the tiny model: attention.qkv is (3*64, 64), feed_forward.w1 (170, 64)
W1 = "layers.0.feed_forward.w1"
QKV = "layers.0.attention.qkv"


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    tiny = write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)
    return Pipeline.load(tiny, device="cpu", dtype="float32").transformer


def pair(n_out: int, n_in: int, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen)


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def w1_pair(transformer, **changes) -> dict[str, torch.Tensor]:
    """A PEFT pair on feed_forward.w1 of block 0, with `changes` ({role: tensor or None}) applied."""
    n_out = transformer.get_submodule(W1).out_features
    down, up = pair(n_out, DIM)
    tensors = {"down": down, "up": up, **changes}
    names = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}
    return {f"transformer.{W1}.{names[r]}": t for r, t in tensors.items() if t is not None}


def refusal(transformer, path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        read_lora(path, transformer)
    return str(err.value)


def test_missing_file_and_folder(transformer, tmp_path):
    assert (
        refusal(transformer, tmp_path / "nope.safetensors")
        == f"{tmp_path / 'nope.safetensors'}: no such LoRA file"
    )
    assert refusal(transformer, tmp_path) == f"{tmp_path} is a folder, not a LoRA file"


KEY = f"transformer.{W1}"
CASES = {
    "no up": (dict(up=None), f"tensor {KEY}.lora_A.weight has no matching lora_up"),
    "no down": (dict(down=None), f"tensor {KEY}.lora_B.weight has no matching lora_down"),
    "3-d down": (dict(down=torch.ones(4, DIM, 1)), f"tensor {KEY}.lora_A.weight is not a linear LoRA (shape (4, 64, 1))"),
    "3-d up": (dict(up=torch.ones(3, 4, 1)), f"tensor {KEY}.lora_B.weight is not a linear LoRA (shape (3, 4, 1))"),
    "rank 0": (
        dict(down=torch.ones(0, DIM), up=torch.ones(HIDDEN, 0)),
        f"tensor {KEY}.lora_A.weight has rank 0 (shape (0, 64)): an empty LoRA",
    ),
    "ranks differ": (
        dict(up=torch.ones(HIDDEN, 3)),
        f"rank mismatch at {KEY}.lora_B.weight: up is ({HIDDEN}, 3), down is (4, 64)",
    ),
    "another size": (
        dict(down=torch.ones(4, 32)),
        f"tensor {KEY}.lora_A.weight makes a {HIDDEN}x32 update, layer '{W1}' is {HIDDEN}x64 (a LoRA for another model size?)",
    ),
    "nan down": (dict(down=torch.full((4, DIM), float("nan"))), f"tensor {KEY}.lora_A.weight holds NaN or infinity"),
    "inf up": (dict(up=torch.full((HIDDEN, 4), float("inf"))), f"tensor {KEY}.lora_B.weight holds NaN or infinity"),
    "nan alpha": (dict(alpha=torch.tensor(float("nan"))), f"tensor {KEY}.alpha holds NaN or infinity"),
    "alpha of two": (dict(alpha=torch.ones(2)), f"tensor {KEY}.alpha should be one number (shape (2,))"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_pair_has_its_own_line(transformer, tmp_path, case):
    changes, message = CASES[case]
    assert transformer.get_submodule(W1).out_features == HIDDEN  # the numbers in the messages above
    path = write(tmp_path / "bad.safetensors", w1_pair(transformer, **changes))
    assert refusal(transformer, path) == f"{path}: {message}"


def test_bad_keys_and_files(transformer, tmp_path):
    good = w1_pair(transformer)
    other = write(
        tmp_path / "other.safetensors", {**good, "transformer.layers.99.x.lora_A.weight": torch.ones(1, 1)}
    )
    assert refusal(transformer, other) == (
        f"{other}: tensor transformer.layers.99.x.lora_A.weight is for layer 'layers.99.x', which this "
        "transformer does not have (a LoRA for another model?)"
    )
    dora = write(tmp_path / "dora.safetensors", {**good, f"{KEY}.dora_scale": torch.ones(1)})
    assert refusal(transformer, dora) == (
        f"{dora}: tensor {KEY}.dora_scale is not part of a LoRA (DoRA, LoKr, full weights?)"
    )
    empty = write(tmp_path / "empty.safetensors", {})
    assert refusal(transformer, empty) == f"{empty}: no LoRA tensors in this file"
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": float("nan"), "r": 4})}
    nan_meta = write(tmp_path / "nan-meta.safetensors", good, meta)
    assert refusal(transformer, nan_meta) == f"{nan_meta}: the alpha of layer '{W1}' is not a finite number"


def updates(lora) -> dict[str, torch.Tensor]:
    return {path: low.up @ low.down for path, low in lora.items()}


def test_diffusers_names_win_over_ours_in_either_key_order(transformer, tmp_path):
    """One file names attention.out and attention.to_out.0, qkv and to_q/to_k/to_v: diffusers keeps the
    diffusers-named (split) pairs. safetensors stores keys sorted, so the prefixes put ours first in one
    file and last in the other."""
    out_path = "layers.0.attention.out"
    diffusers = {}
    for i, p in enumerate("qkv"):
        down, up = pair(DIM, DIM, seed=10 + i)
        diffusers[f"layers.0.attention.to_{p}.lora_A.weight"] = down
        diffusers[f"layers.0.attention.to_{p}.lora_B.weight"] = up
    down, up = pair(DIM, DIM, seed=20)
    (
        diffusers["layers.0.attention.to_out.0.lora_A.weight"],
        diffusers["layers.0.attention.to_out.0.lora_B.weight"],
    ) = down, up
    ours = {}
    for name, (n_out, seed) in {QKV: (3 * DIM, 30), out_path: (DIM, 31)}.items():
        down, up = pair(n_out, DIM, seed=seed)
        ours[f"{name}.lora_A.weight"], ours[f"{name}.lora_B.weight"] = down, up

    want = updates(read_lora(write(tmp_path / "d.safetensors", diffusers), transformer))
    assert sorted(want) == [out_path, QKV]
    for first, last in (("diffusion_model.", "transformer."), ("transformer.", "diffusion_model.")):
        both = {first + k: v for k, v in ours.items()} | {last + k: v for k, v in diffusers.items()}
        got = updates(read_lora(write(tmp_path / f"both-{first}.safetensors", both), transformer))
        assert sorted(got) == sorted(want)
        for path in want:
            torch.testing.assert_close(got[path], want[path], rtol=0, atol=0)


@pytest.mark.parametrize(
    "spelling", ["transformer.layers.0.attention.to_{p}.lora_A.weight", "diffusion_model.layers.0.attention.to.{p}.lora.down.weight",
                 "lora_unet_layers_0_attention_to_{p}.lora_down.weight"],
)  # fmt: skip
def test_split_qkv_spellings_land_in_their_third(transformer, tmp_path, spelling):
    """q, k and v of a split LoRA become rows 0-63, 64-127 and 128-191 of the fused qkv's update."""
    tensors, want = {}, torch.zeros(3 * DIM, DIM)
    for i, p in enumerate("qkv"):
        down, up = pair(DIM, DIM, rank=2 + i, seed=40 + i)
        key = spelling.format(p=p)
        tensors[key] = down
        tensors[key.replace("lora_A", "lora_B").replace("down", "up")] = up
        want[i * DIM : (i + 1) * DIM] = up @ down
    got = updates(read_lora(write(tmp_path / "split.safetensors", tensors), transformer))
    assert list(got) == [QKV]
    torch.testing.assert_close(got[QKV], want, rtol=1e-6, atol=1e-6)
    k_down = spelling.format(p="k")
    tensors[k_down] = tensors[k_down][:0]  # a split third is checked as any pair, and named so
    path = write(tmp_path / "bad-split.safetensors", tensors)
    assert refusal(transformer, path) == f"{path}: tensor {k_down} has rank 0 (shape (0, 64)): an empty LoRA"
