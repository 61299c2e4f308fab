"""Importance matrices: what the collector gathers (against transformers' own Qwen3 and the DiT's token
geometry), streamed = resident, and the files (gguf-py reads ours as llama.cpp's; .dat as sd.cpp writes it)."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
import transformers

from zimage_lite.cli import main
from zimage_lite.pipeline import Pipeline
from zimage_lite.quant.imatrix import Entry, Imatrix, ImatrixCollector, collect, text_encoder_name
from zimage_lite.weights.imatrix_io import from_sdcpp_name, read_imatrix, to_sdcpp_name, write_imatrix

PROMPTS = ["a red fox in the snow", "一只橘猫 on a windowsill"]
STEPS, SIZE = 2, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from zimage_lite.synthetic import write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("imatrix") / "tiny", "tiny", seed=3)


@pytest.fixture(scope="module")
def gathered(tiny) -> Imatrix:
    pipe = Pipeline.load(tiny, device="cpu")
    return collect(pipe, PROMPTS, steps=STEPS, width=SIZE, height=SIZE, dataset="test")


def test_text_encoder_sums_equal_transformers_qwen3_inputs(tiny):
    """Every linear input of our encoder, summed, equals the same linear's input in transformers' Qwen3Model
    loaded from the same folder (the layers Z-Image runs: all but the last)."""
    pipe = Pipeline.load(tiny, device="cpu")
    ids = pipe.tokenizer.encode(PROMPTS)
    ours = ImatrixCollector()
    ours.attach(pipe.text_encoder, text_encoder_name)
    pipe.encode_ids(ids)
    ours.detach()
    mine = ours.result()

    hf = transformers.Qwen3Model.from_pretrained(tiny / "text_encoder", torch_dtype=torch.float32).eval()
    ref: dict[str, list[torch.Tensor]] = {}
    for path, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(
                lambda mod, a, p=path: ref.setdefault(p, []).append(a[0].reshape(-1, a[0].shape[-1]))
            )
    with torch.no_grad():
        for row in ids:
            hf(torch.tensor([row]))
    checked = 0
    for path, xs in ref.items():
        name = text_encoder_name(path)
        if int(path.split(".")[1]) >= pipe.text_encoder.config.num_hidden_layers - 1:
            assert name not in mine  # Z-Image never runs the last layer
            continue
        x = torch.cat(xs).double()
        assert mine[name].count == x.shape[0]
        torch.testing.assert_close(mine[name].sum2, x.square().sum(0), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 7 * (pipe.text_encoder.config.num_hidden_layers - 1)


def test_transformer_entries_are_converter_names_with_token_counts(tiny, gathered):
    """One entry per linear under the converter's names (fused qkv: one, dim channels); rows = prompts x
    steps x tokens (image tokens padded to 32 in the refiner; captions padded to 32 too in the main layers)."""
    from zimage_lite.convert.plan import plan_transformer
    from zimage_lite.weights.checkpoint import open_checkpoint

    plan = plan_transformer(open_checkpoint(tiny / "transformer"), tiny / "transformer", "bf16")
    linears = {o.name for o in plan.outputs if len(o.shape) == 2 and "pad_token" not in o.name}
    names = {n for n in gathered.entries if not n.startswith("blk.")}
    assert names == linears
    dim = plan.outputs[[o.name for o in plan.outputs].index("layers.0.attention.qkv.weight")].shape[1]
    assert gathered.entries["layers.0.attention.qkv.weight"].sum2.shape == (dim,)
    image_tokens = 32 * -(-((SIZE // 16) ** 2) // 32)
    assert (
        gathered.entries["noise_refiner.0.attention.qkv.weight"].count == len(PROMPTS) * STEPS * image_tokens
    )
    assert gathered.chunks == len(PROMPTS) and gathered.chunk_size == (SIZE // 16) ** 2
    layer = gathered.entries["layers.0.feed_forward.w1.weight"].count
    assert (layer - len(PROMPTS) * STEPS * image_tokens) % (32 * STEPS) == 0 and layer > len(
        PROMPTS
    ) * STEPS * image_tokens
    assert all(torch.isfinite(e.sum2).all() and (e.sum2 > 0).all() for e in gathered.entries.values())


def test_streamed_quantized_run_gathers_the_same_as_resident(quantized):
    """Hooks sit on the linears, not on their placement: a run streamed in a tiny budget gives the resident
    run's sums exactly (same device, same order of work)."""
    resident = collect(Pipeline.load(quantized, device="cpu"), PROMPTS[:1], steps=1, width=32, height=32)
    small = Pipeline.load(quantized, device="cpu", vram="14MB")
    streamed = collect(small, PROMPTS[:1], steps=1, width=32, height=32)
    assert small.last_stats.streaming["transformer"]["streamed_blocks"] > 0
    assert resident.entries.keys() == streamed.entries.keys()
    for name, e in resident.entries.items():
        assert torch.equal(e.sum2, streamed.entries[name].sum2) and e.count == streamed.entries[name].count


def test_gguf_is_read_by_gguf_py_as_llama_cpp_imatrix(gathered, tmp_path):
    path = write_imatrix(gathered, tmp_path / "im.gguf")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["test"]
    assert r.fields["imatrix.chunk_count"].contents() == len(PROMPTS)
    assert r.fields["imatrix.chunk_size"].contents() == (SIZE // 16) ** 2
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * len(gathered.entries)
    name = "layers.0.attention.qkv.weight"
    sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    n = gathered.entries[name].sum2.numel()
    assert sums.shape.tolist() == [n, 1] and counts.shape.tolist() == [1, 1]  # ggml ne order, as llama.cpp
    np.testing.assert_array_equal(
        np.asarray(sums.data).reshape(-1), gathered.entries[name].sum2.float().numpy()
    )
    assert float(np.asarray(counts.data).reshape(-1)[0]) == gathered.entries[name].count


def test_gguf_round_trip(gathered, tmp_path):
    back = read_imatrix(write_imatrix(gathered, tmp_path / "im.gguf"))
    assert (back.chunks, back.chunk_size, back.datasets) == (gathered.chunks, gathered.chunk_size, ["test"])
    for name, e in gathered.entries.items():
        torch.testing.assert_close(back.entries[name].values(), e.values(), rtol=1e-6, atol=0)


def _parse_sdcpp_dat(data: bytes) -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """stable-diffusion.cpp's imatrix.cpp layout, read independently of our reader."""
    (n,), at = struct.unpack_from("<i", data), 4
    out = {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, at)
        name = data[at + 4 : at + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, at + 4 + length)
        at += 12 + length
        out[name] = (ncall, np.frombuffer(data, "<f4", nval, at))
        at += 4 * nval
    (last,) = struct.unpack_from("<i", data, at)
    assert at + 4 == len(data)  # sd.cpp writes nothing after the chunk count
    return out, last


def test_dat_is_sdcpp_layout_with_sdcpp_names_and_round_trips(gathered, tmp_path):
    path = write_imatrix(gathered, tmp_path / "im.dat")
    entries, last = _parse_sdcpp_dat(path.read_bytes())
    assert last == gathered.chunks
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in entries
    assert "text_encoders.llm.model.layers.0.self_attn.q_proj.weight" in entries
    ncall, values = entries["text_encoders.llm.model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(
        torch.from_numpy(values / ncall), gathered.entries["blk.0.attn_q.weight"].values()
    )
    back = read_imatrix(path)
    assert back.entries.keys() == gathered.entries.keys()
    for name, e in gathered.entries.items():
        torch.testing.assert_close(back.entries[name].values(), e.values(), rtol=1e-6, atol=0)


def test_llama_cpp_legacy_dat_with_dataset_name_is_read(tmp_path):
    values = np.array([2.0, 4.0, 6.0], dtype="<f4")  # mean square * ncall, ncall 2
    name = b"blk.0.ffn_down.weight"
    data = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 2, 3) + values.tobytes()
    data += struct.pack("<i", 5) + struct.pack("<i", 9) + b"calib.txt"
    (tmp_path / "legacy.dat").write_bytes(data)
    im = read_imatrix(tmp_path / "legacy.dat")
    assert im.chunks == 5 and im.datasets == ["calib.txt"]
    torch.testing.assert_close(im.entries["blk.0.ffn_down.weight"].values(), torch.tensor([1.0, 2.0, 3.0]))


def test_sdcpp_names_map_both_ways():
    for ours in ("layers.3.attention.qkv.weight", "blk.2.ffn_down.weight", "cap_embedder.1.weight"):
        assert from_sdcpp_name(to_sdcpp_name(ours)) == ours
    assert to_sdcpp_name("blk.2.ffn_down.weight") == "text_encoders.llm.model.layers.2.mlp.down_proj.weight"


def test_merge_adds_sums_and_counts():
    a = Imatrix({"x.weight": Entry(torch.tensor([1.0, 2.0], dtype=torch.float64), 2)}, 1, 16, ["a"])
    b = Imatrix({"x.weight": Entry(torch.tensor([3.0, 2.0], dtype=torch.float64), 2)}, 2, 16, ["b"])
    a.merge(b)
    assert a.entries["x.weight"].count == 4 and a.chunks == 3 and a.datasets == ["a", "b"]
    torch.testing.assert_close(a.entries["x.weight"].values(), torch.tensor([1.0, 1.0]))


def test_cli_writes_and_refuses_bad_output(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\n一只狗\n", encoding="utf-8")
    out = tmp_path / "im.gguf"
    args = ["imatrix", "--model", str(tiny), "-o", str(out), "--prompts", str(prompts), "--steps", "1",
            "--width", "32", "--height", "32", "-q", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0 and read_imatrix(out).chunks == 2
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "im.txt"), *args[5:]]) == 2
    assert ".gguf (llama.cpp) or .dat" in capsys.readouterr().err
    assert not (tmp_path / "im.txt").exists()


def test_inspect_names_an_imatrix_file(gathered, tmp_path):
    from zimage_lite.inspect import inspect_path

    report = inspect_path(write_imatrix(gathered, tmp_path / "im.gguf"))
    assert report["component"] is None
    assert (
        report["problem"] == f"an importance matrix: {len(gathered.entries)} entries, {len(PROMPTS)} chunks"
    )


def test_cli_in_adds_an_earlier_file(tiny, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.dat"
    base = ["imatrix", "--model", str(tiny), "--steps", "1", "--width", "32", "--height", "32", "-q"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    assert main([*base, "--prompts", str(prompts), "-o", str(first)]) == 0
    assert main([*base, "--prompts", str(prompts), "-o", str(second), "--in", str(first)]) == 0
    a, b = read_imatrix(first), read_imatrix(second)
    assert b.chunks == 2 * a.chunks
    name = "layers.0.attention.qkv.weight"  # same prompt and seed twice: the same mean, twice the rows
    torch.testing.assert_close(b.entries[name].values(), a.entries[name].values(), rtol=1e-5, atol=0)
