"""convert --imatrix / --tensor-type-rules / --target-size on the small synthetic model.

The reference for the bytes is libggml itself: `ggml_quantize_chunk` called here through ctypes on the
wheel's library, once per whole tensor with the imatrix's mean squares, on weights read with safetensors
(not through our readers or our quantize wrapper). Files are read back with gguf-py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from zimage_lite.cli import main
from zimage_lite.convert.converter import convert
from zimage_lite.convert.recipe import RecipeOptions
from zimage_lite.weights.imatrix_io import read_imatrix

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libggml") is None, reason="no libggml-python wheel")


def libggml() -> ctypes.CDLL:
    folder = Path(next(iter(importlib.util.find_spec("libggml").submodule_search_locations)))
    path = next(p for p in folder.rglob("libggml-base.*") if p.suffix in (".so", ".dylib", ".dll"))
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def ggml_bytes(w: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = src.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    dst = np.zeros(rows * n // block * size, dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    libggml().ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n,
                                  None if im is None else im.ctypes.data)  # fmt: skip
    return dst


def source_weights(model: Path) -> dict[str, np.ndarray]:
    """Weights by the converter's names, read with safetensors: fused qkv = to_q, to_k, to_v on dim 0."""
    from zimage_lite.weights.names_qwen3 import hf_to_gguf_name

    raw = {}
    for folder in ("transformer", "text_encoder"):
        for f in (model / folder).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                raw.update({(folder, k): st.get_tensor(k).float().numpy() for k in st.keys()})
    out = {}
    for (folder, key), value in raw.items():
        if folder == "text_encoder":
            out[hf_to_gguf_name(key)] = value
        elif ".attention.to_q." in key:
            parts = [raw[(folder, key.replace("to_q", p))] for p in ("to_q", "to_k", "to_v")]
            out[key.replace("to_q", "qkv")] = np.concatenate(parts, 0)
        else:
            out[key.replace(".attention.to_out.0.", ".attention.out.")] = value
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from zimage_lite.pipeline import Pipeline
    from zimage_lite.quant.imatrix import collect
    from zimage_lite.synthetic import write_synthetic_model
    from zimage_lite.weights.imatrix_io import write_imatrix

    root = tmp_path_factory.mktemp("calib")
    model = write_synthetic_model(root / "small", "small", seed=5)
    im = collect(
        Pipeline.load(model, device="cpu"), ["a fox", "一只猫"], steps=1, width=32, height=32, dataset="t"
    )
    return model, write_imatrix(im, root / "im.gguf")


@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_m", "q4_0"])
def test_bytes_equal_libggml_with_the_imatrix_for_every_type(small, tmp_path, quant):
    model, im_path = small
    out = tmp_path / quant
    convert(model, out, quant, progress=False, threads=2, options=RecipeOptions(imatrix=im_path))
    imatrix = read_imatrix(im_path)
    weights = source_weights(model)
    seen: set[str] = set()
    for component in ("transformer", "text_encoder"):
        reader = gguf.GGUFReader(str(out / f"{component}.gguf"))
        for t in reader.tensors:
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
                continue
            w = weights[t.name].reshape(-1, weights[t.name].shape[-1])
            values = imatrix.values(t.name)
            uses = values is not None and t.tensor_type != gguf.GGMLQuantizationType.Q8_0
            ref = ggml_bytes(w, t.tensor_type, values.numpy() if uses else None)
            assert np.array_equal(np.asarray(t.data).reshape(-1), ref), t.name
            seen.add(t.tensor_type.name + (" imatrix" if uses else ""))
        fields = reader.fields
        assert fields["quantize.imatrix.file"].contents() == str(im_path)
        assert fields["quantize.imatrix.dataset"].contents() == "t"
        assert fields["quantize.imatrix.entries_count"].contents() == len(imatrix.entries)
        assert fields["quantize.imatrix.chunks_count"].contents() == 2
    expected = {"q4_k_m": {"Q4_K imatrix", "Q5_K imatrix", "Q6_K"}, "q3_k_m": {"Q3_K imatrix", "Q4_K imatrix"},
                "q4_0": {"Q4_0 imatrix"}}[quant]  # fmt: skip
    assert expected <= seen, seen
    manifest = json.loads((out / "zimage-lite.json").read_text())
    assert manifest["imatrix"]["tensors"] > 0 and manifest["imatrix"]["file"] == str(im_path)


def test_imatrix_changes_the_bytes_and_lowers_the_weighted_error(small, tmp_path):
    """Not a no-op: against plain Q4_K, the imatrix-weighted error of a w2 is lower (ggml's intent)."""
    from zimage_lite.quant.formats import dequantize, quantize

    model, im_path = small
    w = torch.from_numpy(source_weights(model)["layers.0.feed_forward.w2.weight"])
    imp = read_imatrix(im_path).values("layers.0.feed_forward.w2.weight")
    plain, calibrated = quantize(w, "Q4_K"), quantize(w, "Q4_K", imatrix=imp)
    assert not torch.equal(plain, calibrated)

    def err(raw):
        return float(((w - dequantize(raw, "Q4_K", tuple(w.shape))).square() * imp).sum())

    assert err(calibrated) < err(plain)


def test_torch_quantizer_and_gpu_are_refused_with_one_line(small, tmp_path, capsys):
    model, im_path = small
    base = ["convert", str(model), "-o", str(tmp_path / "x"), "--quant", "q4_0", "--imatrix", str(im_path)]
    assert main([*base, "--quantizer", "torch"]) == 2
    assert "the torch quantizer (--quantizer torch) has none" in capsys.readouterr().err
    from zimage_lite.errors import UsageError

    with pytest.raises(UsageError, match="which run on the CPU: leave out --device cuda"):
        convert(
            model,
            tmp_path / "x",
            "q4_0",
            progress=False,
            device="cuda",
            options=RecipeOptions(imatrix=im_path),
        )
    assert not (tmp_path / "x").exists()


def test_imatrix_of_another_model_is_refused_before_writing(small, tmp_path):
    from zimage_lite.errors import CheckpointError
    from zimage_lite.quant.imatrix import Entry, Imatrix
    from zimage_lite.weights.imatrix_io import write_imatrix

    model, _ = small
    bad = write_imatrix(Imatrix({"layers.0.attention.qkv.weight": Entry(torch.ones(7, dtype=torch.float64), 1)}, 1),
                        tmp_path / "bad.gguf")  # fmt: skip
    with pytest.raises(CheckpointError, match="an imatrix of another model"):
        convert(model, tmp_path / "o", "q4_k", progress=False, options=RecipeOptions(imatrix=bad))
    assert not (tmp_path / "o").exists()


def test_tensor_type_rules_use_sdcpp_syntax_and_names(small, tmp_path):
    model, _ = small
    rules = r"model\.diffusion_model\.layers\.0\.attention\.qkv=q8_0,feed_forward\.w2=q6_k,attn_v=bf16"
    out = tmp_path / "r"
    convert(model, out, "q4_k", progress=False, options=RecipeOptions(rules=rules))
    dit = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "transformer.gguf")).tensors}
    te = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "text_encoder.gguf")).tensors}
    assert (
        dit["layers.0.attention.qkv.weight"] == "Q8_0" and dit["layers.1.attention.qkv.weight"] == "Q4_0"
    )  # 384-wide rows: Q4_K falls back
    assert dit["layers.1.feed_forward.w2.weight"] == "Q6_K" and te["blk.0.attn_v.weight"] == "BF16"
    assert dit["x_pad_token"] == "F32"  # pads are never retyped (ComfyUI-GGUF expects F32)
    manifest = json.loads((out / "zimage-lite.json").read_text())
    assert (
        manifest["recipe"]["rules"] == rules
        and manifest["recipe"]["types"]["layers.0.attention.qkv.weight"] == "Q8_0"
    )


@pytest.mark.parametrize("rules", ["qkv", "qkv=q7_k", "(=q8_0"])
def test_bad_rules_are_one_line(small, tmp_path, capsys, rules):
    model, _ = small
    assert (
        main(
            [
                "convert",
                str(model),
                "-o",
                str(tmp_path / "x"),
                "--quant",
                "q4_k",
                "--tensor-type-rules",
                rules,
            ]
        )
        == 2
    )
    assert "tensor type rule" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _gguf_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ("transformer.gguf", "text_encoder.gguf"))


@pytest.mark.slow
def test_target_size_fits_and_beats_the_preset_of_the_same_size(small, tmp_path):
    """The files fit the target; at the q4_k_m files' size the chosen types have no more total weighted
    error than q4_k_m's own types (measured here on whole tensors, with the same imatrix)."""
    from zimage_lite.convert.recipe import tensor_errors

    model, im_path = small
    preset = tmp_path / "preset"
    convert(model, preset, "q4_k_m", progress=False, options=RecipeOptions(imatrix=im_path))
    target = _gguf_bytes(preset)
    out = tmp_path / "t"
    convert(
        model,
        out,
        None,
        progress=False,
        threads=2,
        options=RecipeOptions(imatrix=im_path, target_size=target),
    )
    assert _gguf_bytes(out) <= target
    manifest = json.loads((out / "zimage-lite.json").read_text())
    assert manifest["quant"] == f"target-{target}" and manifest["recipe"]["target_size"] == target
    imatrix, weights = read_imatrix(im_path), source_weights(model)

    def total(folder: Path) -> float:
        s = 0.0
        for component in ("transformer", "text_encoder"):
            for t in gguf.GGUFReader(str(folder / f"{component}.gguf")).tensors:
                if (
                    t.name in manifest["recipe"]["types"]
                    and t.name in weights
                    and t.tensor_type.name != "F32"
                ):
                    w = torch.from_numpy(weights[t.name])
                    s += tensor_errors(w, (t.tensor_type.name,), imatrix.values(t.name))[t.tensor_type.name]
        return s

    assert total(out) <= total(preset)


def test_target_size_too_small_is_one_line(small, tmp_path, capsys):
    model, _ = small
    assert main(["convert", str(model), "-o", str(tmp_path / "x"), "--target-size", "1MB"]) == 2
    assert "--target-size" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert (
        main(["convert", str(model), "-o", str(tmp_path / "x"), "--target-size", "1GB", "--quant", "q4_k"])
        == 2
    )
    assert "either --quant or --target-size" in capsys.readouterr().err


def test_imatrix_files_keep_comfyui_layout_names_types_and_shapes(small, tmp_path):
    """Interop: an imatrix changes bytes only; names, types, shapes, architecture and key style are those of
    the plain conversion (ComfyUI-GGUF's layout), and the folder loads and generates."""
    from zimage_lite.inspect import inspect_path
    from zimage_lite.pipeline import Pipeline

    model, im_path = small
    plain, calibrated = tmp_path / "plain", tmp_path / "im"
    convert(model, plain, "q4_k_m", progress=False)
    convert(model, calibrated, "q4_k_m", progress=False, options=RecipeOptions(imatrix=im_path))
    for component in ("transformer", "text_encoder"):
        a, b = (gguf.GGUFReader(str(f / f"{component}.gguf")) for f in (plain, calibrated))
        assert [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors] == [
            (t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors
        ]
        assert a.fields["general.architecture"].contents() == b.fields["general.architecture"].contents()
    ra, rb = (
        inspect_path(plain)["components"]["transformer"],
        inspect_path(calibrated)["components"]["transformer"],
    )
    assert (ra["component"], ra["key_style"], ra["prefix"]) == (
        rb["component"],
        rb["key_style"],
        rb["prefix"],
    )
    assert rb["imatrix"]["file"] == str(im_path) and rb["imatrix"]["chunks"] == 2
    image = Pipeline.load(calibrated, device="cpu").generate("a fox", steps=1, width=32, height=32)[0]
    assert image.size == (32, 32)


def test_choose_fits_the_budget_and_no_single_change_that_fits_lowers_the_error():
    import itertools
    import random

    from zimage_lite.convert.recipe import Candidate, choose

    rng = random.Random(0)
    for _ in range(30):
        cands = []
        for _ in range(4):
            sizes = sorted(rng.sample(range(10, 200), 4))
            errs = sorted((rng.random() for _ in range(4)), reverse=True)
            cands.append(
                Candidate(None, None, [(f"T{k}", b, e) for k, (b, e) in enumerate(zip(sizes, errs))])
            )
        budget = rng.randint(sum(c.options[0][1] for c in cands), sum(c.options[-1][1] for c in cands))
        pick = choose(cands, budget)
        used = sum(c.options[pick[i]][1] for i, c in enumerate(cands))
        err = sum(c.options[pick[i]][2] for i, c in enumerate(cands))
        assert used <= budget
        for i, c in enumerate(cands):
            for _, b, e in c.options:
                if used - c.options[pick[i]][1] + b <= budget:
                    assert err - c.options[pick[i]][2] + e >= err - 1e-12
        best = min(
            sum(c.options[k][2] for c, k in zip(cands, combo))
            for combo in itertools.product(range(4), repeat=4)
            if sum(c.options[k][1] for c, k in zip(cands, combo)) <= budget
        )
        assert err <= best * 1.5 + 1e-12  # a knapsack heuristic: near the optimum, not always at it
