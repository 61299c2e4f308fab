"""The converter: outputs other tools read (gguf-py, safetensors), community layouts load identically,
bad inputs fail with one clear error and leave nothing behind."""

from __future__ import annotations

import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zimage_lite.convert.stream as stream
from zimage_lite.config import DiTConfig, Qwen3Config
from zimage_lite.convert.converter import convert
from zimage_lite.errors import CheckpointError, UsageError, ZImageError
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.quant.formats import QUANTIZER_KEY, quantize
from zimage_lite.quant.fp8 import quantize_fp8
from zimage_lite.synthetic import write_synthetic_model, write_transformer
from zimage_lite.weights.checkpoint import detect, open_checkpoint
from zimage_lite.weights.components import resolve_model
from zimage_lite.weights.gguf import GGUFCheckpoint as GGUFSource
from zimage_lite.weights.gguf_qwen3 import qwen3_config_from_gguf
from zimage_lite.weights.load import build_meta, load_strict
from zimage_lite.weights.names_dit import dit_key_plan, load_dit_tensors
from zimage_lite.weights.names_qwen3 import gguf_to_hf_name, strip_model_prefix

PROMPTS = ["A red fox in the snow, golden light.", "一只橘猫坐在窗台上，阳光洒在它的毛上。"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", 0)


@pytest.fixture(scope="module")
def k_transformer(tmp_path_factory):
    """A transformer whose rows are multiples of 256, so the K types apply (the tiny model's are 64)."""
    cfg = DiTConfig(dim=256, n_layers=1, n_refiner_layers=0, n_heads=2, n_kv_heads=2, cap_feat_dim=256)
    folder = tmp_path_factory.mktemp("k") / "transformer"
    write_transformer(folder, cfg, 5, torch.float32, 1 << 20)  # several shards
    return folder


def _reference(source_path):
    """Our-named dense float32 tensors of a transformer checkpoint (the converter's input)."""
    src = open_checkpoint(source_path)
    plan = dit_key_plan(src.keys())
    return {name: load_dit_tensors(src, plan, name).to(torch.float32) for name in plan}


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _expected_bytes(w: torch.Tensor, qtype: str) -> np.ndarray:
    dense = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    t = w.to(dense[qtype]).contiguous() if qtype in dense else quantize(w, qtype)
    return t.reshape(-1).view(torch.uint8).numpy()


def test_model_folder_q8_0(tiny, tmp_path):
    out = tmp_path / "q8"
    result = convert(tiny, out, "q8_0", progress=False)
    manifest = json.loads((out / "zimage-lite.json").read_text())
    assert manifest["format"] == 1 and manifest["quant"] == "q8_0"
    assert manifest["components"] == {
        "transformer": "transformer.gguf", "text_encoder": "text_encoder.gguf", "vae": "vae", "tokenizer": "tokenizer",
    }  # fmt: skip
    paths = resolve_model(out)
    assert paths.transformer == out / "transformer.gguf" and paths.vae == out / "vae"
    assert result.types["Q8_0"] > 0 and result.in_bytes > result.out_bytes
    # the transformer: gguf-py reads it; bytes are our quantizer's on the source weights
    reader = gguf.GGUFReader(out / "transformer.gguf")
    assert reader.get_field("general.architecture").contents() == "lumina2"
    assert reader.get_field("general.quantization_version").contents() == 2
    ref = _reference(tiny / "transformer")
    assert {t.name for t in reader.tensors} == set(ref)
    for t in reader.tensors:
        written = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(written, _expected_bytes(ref[t.name], t.tensor_type.name)), t.name
        if t.tensor_type.name in ("Q8_0", "Q4_0"):
            by_gguf_py = gguf.quants.quantize(ref[t.name].numpy(), t.tensor_type)
            assert np.array_equal(written, by_gguf_py.reshape(-1)), t.name
    assert {t.tensor_type.name for t in reader.tensors if "pad_token" in t.name} == {"F32"}
    # it loads strictly into the model
    source = open_checkpoint(out / "transformer.gguf")
    model = build_meta(lambda: ZImageDiT(DiTConfig.from_shapes(source.shapes())))
    load_strict(model, {k: source.get(k) for k in source.keys()}, "gguf transformer")
    # the VAE: BF16 of the source, diffusers folder with its config
    vae_src = load_file(str(tiny / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_out = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert (out / "vae" / "config.json").is_file()
    assert all(torch.equal(vae_out[k], v.to(torch.bfloat16)) for k, v in vae_src.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # a converted folder converts again (GGUF in, GGUF out; the tokenizer travels along)
    again = convert(out, tmp_path / "q4", "q4_0", progress=False)
    assert (
        again.types["Q4_0"] > 0
        and resolve_model(tmp_path / "q4").text_encoder == tmp_path / "q4" / "text_encoder.gguf"
    )
    assert open_checkpoint(tmp_path / "q4" / "text_encoder.gguf").tokenizer() is not None


@pytest.mark.parametrize("quant", ["q4_k", "q4_0"])  # every type: test_gguf_io
def test_converted_bytes_are_the_quantizers_and_dequantize_like_gguf_py(k_transformer, tmp_path, quant):
    """Every tensor's bytes are the default quantizer's (ggml's library on the CPU) for its source tensor,
    Q8_0 / Q4_0 ones also gguf-py's numpy quantizer's; our reader decodes them as gguf-py does, bit for
    bit. (gguf-py has no K-quant quantizer: the K-quant bytes against ggml's vectors are in
    test_quant_ggml.py.)"""
    out = tmp_path / f"t-{quant}.gguf"
    convert(k_transformer, out, quant, progress=False)
    reader = gguf.GGUFReader(out)
    ours = GGUFSource(out)
    ref = _reference(k_transformer)
    qtypes = {t.tensor_type.name for t in reader.tensors}
    assert quant.upper() in qtypes
    for t in reader.tensors:
        written = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(written, _expected_bytes(ref[t.name], t.tensor_type.name)), t.name
        if t.tensor_type.name in ("Q8_0", "Q4_0"):
            by_gguf_py = gguf.quants.quantize(ref[t.name].numpy(), t.tensor_type)
            assert np.array_equal(written, by_gguf_py.reshape(-1)), t.name
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = ours.get(t.name).to(torch.float32).numpy()
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), t.name


def _gguf_py_copy(ours: GGUFSource, ref: dict[str, torch.Tensor], path, prefix: str, arch: str):
    """The same weights written by gguf-py's own writer and quantizer (a community file stand-in)."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name in ours.keys():
        qtype = gguf.GGMLQuantizationType[ours.qtype(name)]
        data = gguf.quants.quantize(ref[name].numpy(), qtype)
        writer.add_tensor(prefix + name, data, raw_dtype=None if qtype.name == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_community_ggufs_load_the_same_weights(k_transformer, tmp_path):
    ours_path = tmp_path / "ours.gguf"
    convert(k_transformer, ours_path, "q8_0", progress=False)
    ours = open_checkpoint(ours_path)
    ref = _reference(k_transformer)
    _gguf_py_copy(ours, ref, tmp_path / "comfy.gguf", "", "lumina2")
    _gguf_py_copy(ours, ref, tmp_path / "sdcpp.gguf", "model.diffusion_model.", "")
    for name in ("comfy.gguf", "sdcpp.gguf"):
        other = open_checkpoint(tmp_path / name)
        assert detect(tmp_path / name).component == "transformer"
        assert sorted(other.keys()) == sorted(ours.keys())
        for key in ours.keys():
            assert other.qtype(key) == ours.qtype(key)
            assert torch.equal(other.get(key), ours.get(key)), (name, key)
    assert open_checkpoint(tmp_path / "sdcpp.gguf").architecture is None
    assert detect(tmp_path / "sdcpp.gguf").prefix == "model.diffusion_model."


def test_fp8_transformer_is_comfyui_comfy_quant(tiny, tmp_path):
    out = tmp_path / "t.safetensors"
    convert(tiny / "transformer", out, "fp8", progress=False)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        stored = set(f.keys())
        mod = f.get_tensor("layers.0.adaLN_modulation.0.weight")
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert "layers.0.attention.qkv" in layers and "layers.0.adaLN_modulation.0" not in layers
    assert mod.dtype == torch.bfloat16  # FP8 on modulation wrecks Z-Image: kept BF16
    source = open_checkpoint(out)
    assert source.fp8_variant == "comfy_quant"
    ref = _reference(tiny / "transformer")
    assert sorted(source.keys()) == sorted(ref)
    assert {f"{layer}.comfy_quant" for layer in layers} <= stored
    for name in ref:
        if source.qtype(name) == "FP8_E4M3":
            q, scale = quantize_fp8(ref[name])
            qw = source.get_quant(name)
            assert torch.equal(qw.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
                qw.scale, scale
            )
            assert torch.equal(source.get(name), q.to(torch.float32) * scale)


def test_text_encoder_gguf_with_tokenizer(tiny, tmp_path):
    out = tmp_path / "te.gguf"
    convert(tiny / "text_encoder", out, "q8_0", progress=False)  # finds ../tokenizer itself
    source = open_checkpoint(out)
    assert source.architecture == "qwen3" and detect(out).component == "text_encoder"
    config = Qwen3Config.from_json(tiny / "text_encoder" / "config.json")
    assert qwen3_config_from_gguf(source) == config
    src = open_checkpoint(tiny / "text_encoder")
    bare = strip_model_prefix(src.keys())
    assert {gguf_to_hf_name(k) for k in source.keys()} == set(bare)  # every layer and the final norm
    assert (
        "output_norm.weight" in source.keys()
        and f"blk.{config.num_hidden_layers - 1}.attn_q.weight" in source.keys()
    )
    for key in source.keys():
        w = src.get(bare[gguf_to_hf_name(key)]).to(torch.float32)
        expected = _expected_bytes(w, source.qtype(key))
        assert np.array_equal(source.raw(key).numpy(), expected), key
    from tokenizers import Tokenizer

    want = Tokenizer.from_file(str(tiny / "tokenizer" / "tokenizer.json"))
    tok = source.tokenizer()
    for prompt in PROMPTS:
        assert tok.encode(prompt).ids == want.encode(prompt).ids
    # re-quantizing our own GGUF keeps the tokenizer and the config
    again = tmp_path / "te-q4.gguf"
    convert(out, again, "q4_0", progress=False)
    assert open_checkpoint(again).tokenizer().encode(PROMPTS[1]).ids == want.encode(PROMPTS[1]).ids
    assert qwen3_config_from_gguf(open_checkpoint(again)) == config


def test_threads_and_device_do_not_change_bytes(k_transformer, tmp_path):
    convert(k_transformer, tmp_path / "a.gguf", "q4_0", progress=False, threads=1)
    convert(k_transformer, tmp_path / "b.gguf", "q4_0", progress=False, threads=2)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    convert(k_transformer, tmp_path / "c.gguf", "q4_0", progress=False, device="cpu")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "c.gguf").read_bytes()


def _tensor_bytes(path):
    source = GGUFSource(path)
    return {k: source.raw(k).numpy().tobytes() for k in source.keys()}


def _quantizer_key(path):
    return GGUFSource(path).metadata.get(QUANTIZER_KEY)


@pytest.mark.gpu
def test_cuda_quantization_gives_the_same_tensors(k_transformer, tmp_path):
    for quant in ("q8_0", "q4_0"):
        convert(k_transformer, tmp_path / f"cpu-{quant}.gguf", quant, progress=False)
        convert(k_transformer, tmp_path / f"gpu-{quant}.gguf", quant, progress=False, device="cuda")
        cpu, gpu = tmp_path / f"cpu-{quant}.gguf", tmp_path / f"gpu-{quant}.gguf"
        assert _tensor_bytes(cpu) == _tensor_bytes(gpu)
        assert _quantizer_key(gpu).startswith("torch ")  # the file says who wrote it


def test_k_quants_are_refused_off_the_cpu_before_anything_is_written(k_transformer, tmp_path):
    """No GPU needed: the plan is refused before any tensor reaches a device."""
    for quant in ("q4_k", "q6_k", "q4_k_m"):
        with pytest.raises(UsageError, match=f"quantizes q8_0, q4_0, fp8 and bf16 only, not {quant}: .* CPU"):
            convert(k_transformer, tmp_path / "t.gguf", quant, progress=False, device="cuda")
    assert _listing(tmp_path) == []


def test_k_quant_stragglers_of_device_presets_are_ggmls_on_the_cpu():
    """q4_0's text encoder keeps its token table Q6_K (llama.cpp's choice): with --device cuda that
    tensor is quantized on the CPU, and the file names both quantizers."""
    from zimage_lite.convert.plan import ComponentPlan
    from zimage_lite.convert.quantizers import quantizer_metadata
    from zimage_lite.convert.stream import Job, OutTensor
    from zimage_lite.quant.formats import pick_quantizer, quantize_on, quantizer_version

    jobs = [
        Job(n, (8, 256), q, None, 0, [OutTensor(n, (8, 256), q)]) for n, q in [("a", "Q4_0"), ("b", "Q6_K")]
    ]
    plan = ComponentPlan("text_encoder", "gguf", jobs)
    assert quantize_on("Q4_0", "cuda") == "cuda" and quantize_on("Q6_K", "cuda") == "cpu"
    gpu, cpu = quantizer_version("torch"), quantizer_version(pick_quantizer("cpu"))
    expected = f"{gpu} for Q4_0; {cpu} for Q6_K" if gpu != cpu else gpu
    assert quantizer_metadata(plan, "cuda", None) == {QUANTIZER_KEY: expected}
    assert quantizer_metadata(plan, None, None) == {QUANTIZER_KEY: cpu}


@pytest.mark.parametrize("quant", ["q4_0", "q4_k_m"])
def test_files_say_which_quantizer_wrote_them(k_transformer, tmp_path, monkeypatch, quant):
    from zimage_lite.quant import formats

    monkeypatch.setattr(formats, "_GGML_CHUNK_ELEMENTS", 256 * 16)  # several chunks per tensor, shared
    convert(k_transformer, tmp_path / "torch.gguf", quant, progress=False, quantizer="torch")
    assert _quantizer_key(tmp_path / "torch.gguf").startswith(f"torch {torch.__version__}")
    if importlib.util.find_spec("libggml") is None:
        pytest.skip("libggml-python has no wheel for this platform: only the torch quantizer was checked")
    convert(k_transformer, tmp_path / "ggml.gguf", quant, progress=False, threads=2)
    assert _quantizer_key(tmp_path / "ggml.gguf").startswith("ggml 0.")
    convert(k_transformer, tmp_path / "one.gguf", quant, progress=False, threads=1, quantizer="ggml")
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "ggml.gguf").read_bytes()
    ggml, ours = _tensor_bytes(tmp_path / "ggml.gguf"), _tensor_bytes(tmp_path / "torch.gguf")
    assert ggml.keys() == ours.keys()
    if quant == "q4_0":  # the K-quants promise less of the fallback (test_quant_ggml.py)
        assert ggml == ours


def test_bf16_files_name_no_quantizer(k_transformer, tmp_path):
    convert(k_transformer, tmp_path / "t.gguf", "bf16", progress=False)
    assert _quantizer_key(tmp_path / "t.gguf") is None


def _single_transformer_file(tiny, path, edit=None):
    tensors = {
        k: v.clone() for k, v in load_file(str(next((tiny / "transformer").glob("*.safetensors")))).items()
    }
    for f in sorted((tiny / "transformer").glob("*.safetensors"))[1:]:
        tensors.update(load_file(str(f)))
    if edit:
        edit(tensors)
    save_file(tensors, str(path))
    return path


def _bad_inputs(tiny, tmp):
    (tmp / "in").mkdir()
    shard = next((tiny / "transformer").glob("*.safetensors"))
    cut = tmp / "in" / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[:-1000])
    rand = tmp / "in" / "random.gguf"
    rand.write_bytes(np.random.default_rng(1).bytes(10000))
    flux = tmp / "in" / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "img_in.weight": torch.zeros(32, 64),
               "single_blocks.0.linear1.weight": torch.zeros(8, 32)}, str(flux))  # fmt: skip
    sdxl = tmp / "in" / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16)}, str(sdxl))  # fmt: skip

    def nan(t):
        t["layers.1.feed_forward.w3.weight"][3, 2] = float("nan")

    def missing(t):
        del t["layers.0.feed_forward.w2.weight"]

    def misshapen(t):
        t["layers.0.attention.to_out.0.weight"] = torch.zeros(64, 60)

    return {
        "truncated": (cut, CheckpointError, "truncated"),
        "random bytes": (rand, CheckpointError, "not a GGUF file"),
        "flux": (flux, CheckpointError, "FLUX"),
        "sdxl": (sdxl, CheckpointError, "SDXL"),
        "nan": (
            _single_transformer_file(tiny, tmp / "in" / "nan.safetensors", nan),
            CheckpointError,
            "layers.1.feed_forward.w3.weight.*NaN",
        ),
        "missing": (
            _single_transformer_file(tiny, tmp / "in" / "m.safetensors", missing),
            CheckpointError,
            "missing tensors: layers.0.feed_forward.w2.weight",
        ),
        "misshapen": (
            _single_transformer_file(tiny, tmp / "in" / "s.safetensors", misshapen),
            CheckpointError,
            r"layers.0.attention.out.weight \(64, 60\)",
        ),
    }


def test_bad_inputs_fail_cleanly(tiny, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for label, (src, error, pattern) in _bad_inputs(tiny, tmp_path).items():
        with pytest.raises(error, match=pattern) as info:
            convert(src, out_dir / "x.gguf", "q4_0", progress=False)
        assert isinstance(info.value, ZImageError) and "\n" not in str(info.value), label
        assert _listing(out_dir) == [], label
    with pytest.raises(UsageError, match="unknown quantization 'q1_k'"):
        convert(tiny / "transformer", out_dir / "x.gguf", "q1_k", progress=False)
    (out_dir / "x.gguf").write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists"):
        convert(tiny / "transformer", out_dir / "x.gguf", "q4_0", progress=False)
    assert (out_dir / "x.gguf").read_bytes() == b"keep me" and _listing(out_dir) == ["x.gguf"]
    with pytest.raises(UsageError, match=r"\.gguf file"):
        convert(tiny / "transformer", out_dir / "y.safetensors", "q4_0", progress=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_interrupt_leaves_nothing(tiny, tmp_path, monkeypatch, threads):
    calls = {"n": 0}
    real = stream.encode

    def flaky(job, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(job, *args)

    monkeypatch.setattr(stream, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny, tmp_path / "model", "q8_0", progress=False, threads=threads)
    assert _listing(tmp_path) == []
    # with --force, an existing output survives an interrupted replacement untouched
    (tmp_path / "t.gguf").write_bytes(b"old")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert(
            tiny / "transformer", tmp_path / "t.gguf", "q8_0", force=True, progress=False, threads=threads
        )
    assert _listing(tmp_path) == ["t.gguf"] and (tmp_path / "t.gguf").read_bytes() == b"old"
    monkeypatch.setattr(stream, "encode", real)
    convert(tiny / "transformer", tmp_path / "t.gguf", "q8_0", force=True, progress=False, threads=threads)
    assert GGUFSource(tmp_path / "t.gguf").architecture == "lumina2" and _listing(tmp_path) == ["t.gguf"]


@pytest.mark.parametrize("threads", [1, 2])
def test_every_job_is_prefetched_before_it_is_encoded(tiny, tmp_path, monkeypatch, threads):
    events = []
    real_encode, real_prefetch = stream.encode, stream._prefetch

    def encode(job, *args):
        events.append(("encode", job.name))
        return real_encode(job, *args)

    def prefetch(job):
        assert job.prefetch is not None  # safetensors input: the source can read ahead
        events.append(("prefetch", job.name))
        real_prefetch(job)

    monkeypatch.setattr(stream, "encode", encode)
    monkeypatch.setattr(stream, "_prefetch", prefetch)
    convert(tiny / "transformer", tmp_path / "t.gguf", "q8_0", progress=False, threads=threads)
    order = {event: i for i, event in enumerate(events)}
    names = {name for _, name in events}
    assert len(events) == 2 * len(names) > 2
    assert all(order[("prefetch", n)] < order[("encode", n)] for n in names)


def test_paging_hints_keep_the_data(tiny, tmp_path):
    """Read-ahead and dropping pages change residency only: views read the same values afterwards."""
    from zimage_lite.weights.safetensors import SafetensorsCheckpoint as MappedSafetensors

    files = sorted((tiny / "transformer").glob("*.safetensors"))
    mapped = MappedSafetensors(files)
    reference = {k: v.clone() for f in files for k, v in load_file(str(f)).items()}
    for name, value in reference.items():
        mapped.prefetch(name)
        assert torch.equal(mapped.view(name), value)
        mapped.release(name)
        assert torch.equal(mapped.view(name), value)
    convert(tiny / "transformer", tmp_path / "t.gguf", "bf16", progress=False)
    source = GGUFSource(tmp_path / "t.gguf")
    for name in source.keys():
        before = source.get(name)
        source.prefetch(name)
        source.release(name)
        assert torch.equal(source.get_view(name), before)


def test_flat_pad_tokens_become_1_by_dim(tiny, tmp_path):
    def flatten(t):
        for k in ("x_pad_token", "cap_pad_token"):
            t[k] = t[k].reshape(-1).contiguous()

    src = _single_transformer_file(tiny, tmp_path / "flat.safetensors", flatten)
    convert(src, tmp_path / "flat.gguf", "q8_0", progress=False)
    assert GGUFSource(tmp_path / "flat.gguf").shape("x_pad_token") == (1, 64)


def test_vae_and_progress(tiny, tmp_path, capsys):
    out = tmp_path / "vae.safetensors"
    convert(tiny / "vae", out, "q4_k", progress=True)
    assert "vae" in capsys.readouterr().err  # the tqdm bar
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert detect(out).component == "vae"
    convert(tiny / "vae", tmp_path, "bf16", progress=False)  # an existing folder: the file goes inside
    assert (tmp_path / "vae-bf16.safetensors").is_file()


def test_comfyui_single_files_convert(tiny, tmp_path):
    """ComfyUI repacks: prefixed transformer with a stray norm_final, original-named (ae) VAE; FP8 input."""
    from zimage_lite.weights.names_dit import COMFY_PREFIX
    from zimage_lite.weights.names_vae import vae_to_original

    ref = _reference(tiny / "transformer")
    comfy = {COMFY_PREFIX + k: v.to(torch.bfloat16) for k, v in ref.items()}
    comfy[COMFY_PREFIX + "norm_final.weight"] = torch.ones(64)
    save_file(comfy, str(tmp_path / "z_image_turbo_bf16.safetensors"))
    convert(tmp_path / "z_image_turbo_bf16.safetensors", tmp_path / "t.gguf", "q8_0", progress=False)
    out = open_checkpoint(tmp_path / "t.gguf")
    assert sorted(out.keys()) == sorted(ref) and out.get("x_pad_token").dtype == torch.float32
    assert torch.equal(out.get("x_pad_token"), ref["x_pad_token"].to(torch.bfloat16).float())

    ae = vae_to_original(load_file(str(tiny / "vae" / "diffusion_pytorch_model.safetensors")))
    save_file(ae, str(tmp_path / "ae.safetensors"))
    convert(tmp_path / "ae.safetensors", tmp_path / "ae-bf16.safetensors", "bf16", progress=False)
    assert sorted(load_file(str(tmp_path / "ae-bf16.safetensors"))) == sorted(ae)  # names kept (ComfyUI's)

    convert(tiny / "transformer", tmp_path / "t8.safetensors", "fp8", progress=False)
    convert(tmp_path / "t8.safetensors", tmp_path / "from-fp8.gguf", "q8_0", progress=False)
    fp8 = open_checkpoint(tmp_path / "t8.safetensors")
    back = open_checkpoint(tmp_path / "from-fp8.gguf")
    name = "layers.0.attention.qkv.weight"
    assert back.qtype(name) == "Q8_0"
    assert torch.equal(back.get_quant(name).data, quantize(fp8.get(name), "Q8_0"))


def test_text_encoder_gguf_loads_into_the_encoder(tiny, tmp_path):
    """The recipe a loader follows: config from qwen3.* keys, names via gguf_to_hf_name, last layer dropped."""
    from zimage_lite.models.qwen3 import Qwen3Encoder
    from zimage_lite.weights.loaders import load_text_encoder
    from zimage_lite.weights.names_qwen3 import is_unused_by_encoder

    convert(tiny / "text_encoder", tmp_path / "te.gguf", "bf16", progress=False)
    source = open_checkpoint(tmp_path / "te.gguf")
    config = qwen3_config_from_gguf(source)
    tensors = {gguf_to_hf_name(k): source.get(k) for k in source.keys()}
    tensors = {k: v for k, v in tensors.items() if not is_unused_by_encoder(k, config.num_hidden_layers)}
    ours = load_strict(
        build_meta(lambda: Qwen3Encoder(config)), tensors, "te gguf", dtype=torch.float32
    ).eval()
    ref = load_text_encoder(tiny / "text_encoder", torch.float32).eval()
    from zimage_lite.quant.policy import choose_qtype

    with torch.no_grad():  # what the bf16 preset stores: BF16 matrices, small and 1-D tensors F32
        for name, p in ref.named_parameters():
            if choose_qtype(name, tuple(p.shape), "bf16", "text_encoder") == "BF16":
                p.copy_(p.to(torch.bfloat16).float())
    ids = torch.tensor([source.tokenizer().encode(PROMPTS[0]).ids])
    via_loader = load_text_encoder(tmp_path / "te.gguf", torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids), ref(ids)) and torch.equal(via_loader(ids), ref(ids))
