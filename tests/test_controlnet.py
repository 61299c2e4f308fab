"""Fun-Controlnet-Union: loading every version and layout, and parity with diffusers'
ZImageControlNetPipeline / ZImageControlNetInpaintPipeline on tiny random models, float32, same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from controlnet_fixtures import REAL, build, write_alibaba, write_diffusers
from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline, ZImagePipeline
from safetensors.torch import load_file, save_file
from test_img2img import mask_picture, max_diff, picture

from zimage_lite.errors import CheckpointError, ConfigError, UsageError
from zimage_lite.models.controlnet import execution_order
from zimage_lite.pipeline import Pipeline
from zimage_lite.runtime.budget import parse_vram
from zimage_lite.synthetic import write_synthetic_model
from zimage_lite.weights.names_controlnet import load_controlnet

PROMPT = "a red barn"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny branches for the tiny transformer (2 layers, 1 refiner layer): folder path and diffusers model."""
    root = tmp_path_factory.mktemp("controlnets")
    made = {
        "v1": build(None, 16, [0, 1], None, n_refiner=1, seed=1),
        "2.1-zero": build(
            "control_noise_refiner", 33, [0, 1], [0], n_refiner=1, seed=2, zero_refiner_out=True
        ),
        "2.1": build("control_noise_refiner", 33, [0, 1], [0], n_refiner=1, seed=3),
        "2.0": build("control_layers", 33, [0, 1], [0], n_refiner=1, seed=4),
    }
    return {k: (write_diffusers(root / k, net), net) for k, net in made.items()}


def diffusers_images(tiny, net, W, H, batch, seed, scale, control, inpaint=None, mask=None):
    base = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    if inpaint is None:
        ref, extra = ZImageControlNetPipeline(**base.components, controlnet=net), {}
    else:
        ref = ZImageControlNetInpaintPipeline(**base.components, controlnet=net)
        extra = dict(image=inpaint, mask_image=mask)
    return ref(
        PROMPT, height=H, width=W, num_inference_steps=4, guidance_scale=0.0, num_images_per_prompt=batch,
        generator=torch.Generator("cpu").manual_seed(seed), control_image=control,
        controlnet_conditioning_scale=scale, **extra,
    ).images  # fmt: skip


@pytest.mark.parametrize("version", list(REAL))
def test_alibaba_files_load_as_their_version(tmp_path, version):
    net = load_controlnet(write_alibaba(tmp_path / "cn.safetensors", version), torch.float32)
    cfg = net.config
    assert (cfg.version, list(cfg.places), cfg.control_in_dim) == (
        version,
        REAL[version][2],
        REAL[version][1],
    )
    assert list(cfg.refiner_places) == (REAL[version][3] or [])
    # 2.0's untrained refiner blocks are dropped; 2.1's are its refiner stage; v1's are plain blocks
    assert len(net.control_noise_refiner) == (0 if version == "2.0" else 2)


def test_diffusers_folder_takes_its_config(nets):
    net = load_controlnet(nets["2.1"][0], torch.float32)
    assert (net.config.version, net.config.places, net.config.refiner_places) == ("2.1", (0, 1), (0,))


def test_unknown_layouts_are_refused(tmp_path):
    path = write_alibaba(tmp_path / "cn.safetensors", "2.1-lite")
    state = load_file(str(path))
    del state["control_layers.2.after_proj.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: control_layers.2.after_proj.weight"):
        load_controlnet(tmp_path / "broken.safetensors", torch.float32)
    two = {k: v for k, v in state.items() if not k.startswith("control_layers.2.")}
    save_file(two, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="2.1-lite-style with 2 control blocks"):
        load_controlnet(tmp_path / "two.safetensors", torch.float32)
    state["control_all_x_embedder.2-1.weight"] = torch.zeros(64, 4 * 20)
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="20 control input channels"):
        load_controlnet(tmp_path / "wide.safetensors", torch.float32)
    save_file({"x_pad_token": torch.zeros(1, 64)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="not a Z-Image ControlNet"):
        load_controlnet(tmp_path / "dit.safetensors", torch.float32)


def test_a_branch_for_another_transformer_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"after main layers \[0, 2, 4"):
        Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=write_alibaba(tmp_path / "a", "2.1"))
    wide = write_diffusers(tmp_path / "w", build(None, 16, [0, 1], None, n_refiner=1, dim=96, heads=2))
    with pytest.raises(ConfigError, match="96 wide"):
        Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=wide)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,W,H,batch,scale",
    [
        ("v1", 80, 48, 2, 0.5),
        ("v1", 48, 64, 1, 1.0),
        ("2.1-zero", 64, 64, 1, 1.0),
        ("2.1-zero", 48, 80, 2, 0.5),
    ],
)
def test_control_matches_diffusers_fp32(tiny, nets, name, W, H, batch, scale):
    path, net = nets[name]
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=path)
    control = picture(W, H, 3)
    ours = pipe.generate(PROMPT, seed=11, steps=4, width=W, height=H, batch=batch, control_image=control,
                         control_scale=scale)  # fmt: skip
    theirs = diffusers_images(tiny, net, W, H, batch, 11, scale, control)
    plain = pipe.generate(PROMPT, seed=11, steps=4, width=W, height=H, batch=batch)
    assert ours[0].size == (W, H) and len(ours) == batch
    assert max_diff(ours, theirs) <= 1
    assert max_diff(ours, plain) > 20  # the control changed the picture


@pytest.mark.slow
def test_inpaint_matches_diffusers_fp32(tiny, nets):
    """Batch 1: diffusers 0.42's inpaint pipeline does not repeat the mask for a batch (it fails)."""
    path, net = nets["2.1-zero"]
    W, H = 80, 48
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=path)
    control, image, mask = picture(W, H, 3), picture(W, H, 5), mask_picture(W, H)
    ours = pipe.generate(PROMPT, seed=7, steps=4, width=W, height=H, control_image=control,
                         control_inpaint=image, control_mask=mask, control_scale=0.8)  # fmt: skip
    theirs = diffusers_images(tiny, net, W, H, 1, 7, 0.8, control, image, mask)
    assert max_diff(ours, theirs) <= 1


def authors_reference(tiny, net, W, H, seed, scale, control):
    """The authors' refiner-stage semantics from diffusers' own modules: the refiner-stage hints the
    ControlNet computes are also added to the base transformer's noise refiner (VideoX-Fun's
    BaseZImageTransformerBlock), not only to the ControlNet's copy of the image stream. 2.1 computes
    them with its control_noise_refiner blocks; 2.0 with its main control blocks, run once over the image
    tokens (the refiner stage) before they run again over the joint sequence (the main stage)."""
    base = ZImagePipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    ref = ZImageControlNetPipeline(**base.components, controlnet=net)
    two_0 = net.config.add_control_noise_refiner == "control_layers"
    stage_blocks = net.control_layers if two_0 else net.control_noise_refiner
    hints, in_transformer, calls = {}, [False], [0]

    def keep_hints(i):
        def hook(module, args, out):  # out: stacked [hint_0 .. hint_i, c]
            calls[0] += 1
            if calls[0] <= len(stage_blocks):  # 2.0: the first pass of each net forward is the refiner stage
                hints[i] = out[i] * scale

        return hook

    def add_hint(i):
        def hook(module, args, out):
            return out + hints[i] if in_transformer[0] else out

        return hook

    for i, block in enumerate(stage_blocks):
        block.register_forward_hook(keep_hints(i))
    for i in net.config.control_refiner_layers_places:
        ref.transformer.noise_refiner[i].register_forward_hook(add_hint(i))
    net_forward, forward = net.forward, ref.transformer.forward

    def controlnet_forward(*args, **kwargs):
        calls[0] = 0
        return net_forward(*args, **kwargs)

    def transformer_forward(*args, **kwargs):
        in_transformer[0] = True
        try:
            return forward(*args, **kwargs)
        finally:
            in_transformer[0] = False

    net.forward, ref.transformer.forward = controlnet_forward, transformer_forward
    try:
        return ref(
            PROMPT, height=H, width=W, num_inference_steps=4, guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed), control_image=control,
            controlnet_conditioning_scale=scale,
        ).images  # fmt: skip
    finally:
        del net.forward  # the module fixture is shared: its own forward again


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.1", "2.0"])
def test_refiner_hints_follow_the_authors_not_diffusers(tiny, nets, version):
    path, net = nets[version]
    W = H = 64
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=path)
    control = picture(W, H, 3)
    ours = pipe.generate(PROMPT, seed=5, steps=4, width=W, height=H, control_image=control, control_scale=1.0)
    assert max_diff(ours, authors_reference(tiny, net, W, H, 5, 1.0, control)) <= 1
    assert max_diff(ours, diffusers_images(tiny, net, W, H, 1, 5, 1.0, control)) > 5


def _minimum_budget(model, path) -> int:
    """The smallest budget that plans, read from the refusal of a far too small one."""
    pipe = Pipeline.load(model, device="cpu", controlnet=path, vram=1024)
    with pytest.raises(UsageError, match="below the minimum") as info:
        pipe.generate_latents(PROMPT, seed=0, width=32, height=32, control_image=picture(32, 32))
    return parse_vram(str(info.value).split("below the minimum ")[1].split(" for")[0].replace(" ", ""))


def test_control_blocks_stream_through_the_ring_in_order(quantized, tmp_path):
    """Under a budget that streams (the small q4_k_m model, a 2.1-style branch of its width), each control
    block is fetched just before the main layer that takes its hint (the planned order: no prefetch
    miss), and the latents are bit-identical to the resident run's."""
    path = write_diffusers(tmp_path / "cn", build("control_noise_refiner", 33, [0, 1], [0], n_refiner=1,
                                                  dim=384, heads=3))  # fmt: skip
    kw = dict(seed=0, steps=2, width=32, height=32, control_image=picture(32, 32))
    resident = Pipeline.load(quantized, device="cpu", controlnet=path).generate_latents(PROMPT, **kw)
    pipe = Pipeline.load(quantized, device="cpu", controlnet=path, vram=_minimum_budget(quantized, path))
    planned = execution_order(pipe.transformer, pipe.controlnet)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, a: ran.append(m)) for b in planned]
    latents = pipe.generate_latents(PROMPT, **kw)
    for h in hooks:
        h.remove()
    assert [id(m) for m in ran] == [id(m) for m in planned] * 2  # two steps
    stats = pipe.last_stats.streaming["transformer"]
    assert stats["streamed_blocks"] > 0 and stats["prefetch_misses"] == 0
    assert torch.equal(latents, resident)
    plan = pipe.last_stats.streaming["plans"]["transformer"]
    assert len(plan["resident_blocks"]) + len(plan["streamed_blocks"]) == len(planned)


def test_control_range_limits_the_steps(tiny, nets):
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=nets["v1"][0])
    kw = dict(seed=3, steps=4, width=32, height=32)
    plain = pipe.generate(PROMPT, **kw)[0]
    full = pipe.generate(PROMPT, control_image=picture(32, 32), **kw)[0]
    late = pipe.generate(PROMPT, control_image=picture(32, 32), control_start=0.5, **kw)[0]
    none = pipe.generate(PROMPT, control_image=picture(32, 32), control_scale=0.0, **kw)[0]
    assert max_diff([none], [plain]) == 0
    assert max_diff([late], [plain]) > 0 and max_diff([late], [full]) > 0
    assert np.asarray(full).std() > 0


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "fp8"])
def test_converted_controlnet_loads_as_its_version(nets, tmp_path, quant):
    from zimage_lite.convert.converter import convert

    out = convert(nets["2.1"][0], tmp_path / "cn", quant).out
    cfg = load_controlnet(out, torch.float32).config
    assert (cfg.version, cfg.places, cfg.refiner_places) == ("2.1", (0, 1), (0,))


def test_alibaba_2_0_converts_without_its_unused_refiner(tmp_path):
    from zimage_lite.convert.converter import convert
    from zimage_lite.inspect import inspect_path

    out = convert(write_alibaba(tmp_path / "a.safetensors", "2.0"), tmp_path / "a.gguf", "q8_0").out
    report = inspect_path(out)
    assert report["component"] == "controlnet" and report["controlnet"]["version"] == "2.0"
    assert not any("control_noise_refiner" in k for k in load_controlnet(out, torch.float32).state_dict())


def test_q8_0_control_effect_correlates_with_float32(tiny, nets, tmp_path):
    """Control minus no control, in latents: the q8_0 branch's effect follows the float32 branch's."""
    from zimage_lite.convert.converter import convert

    q8 = convert(nets["2.1"][0], tmp_path / "cn", "q8_0").out
    kw = dict(seed=2, steps=4, width=64, height=48)
    effects = []
    for path in (nets["2.1"][0], q8):
        pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=path)
        plain = pipe.generate_latents(PROMPT, **kw)
        effects.append(
            (pipe.generate_latents(PROMPT, control_image=picture(64, 48, 3), **kw) - plain).flatten()
        )
    corr = torch.corrcoef(torch.stack(effects))[0, 1]
    assert effects[0].abs().mean() > 0.05 and corr > 0.9, (float(corr), float(effects[0].abs().mean()))


def test_one_hint_is_alive_at_a_time(tiny, nets, monkeypatch):
    """Every hint the chains hand to the DiT is gone before the next one is made: never two live
    (diffusers computes all of them up front and holds them through the main layers)."""
    import weakref

    from zimage_lite.models.controlnet import HintChain

    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=nets["2.1"][0])
    alive, most = [], [0]
    before = HintChain.before

    def watched(self, i, x):  # the real method, its results watched through weak references
        hint = before(self, i, x)
        if hint is not None:
            most[0] = max(most[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(hint))
        return hint

    monkeypatch.setattr(HintChain, "before", watched)
    pipe.generate_latents(PROMPT, seed=0, steps=2, width=32, height=32, control_image=picture(32, 32))
    assert len(alive) == 2 * 3 and most[0] == 0


def test_planned_hint_bytes_are_the_control_stream_and_one_hint(tiny, nets, monkeypatch):
    """What the planner reserves for the branch (live_hint_bytes over the joint tokens) is the control
    stream plus one hint, as the chains hold them; diffusers' way (every hint up front) is reserved as
    all of them."""
    from zimage_lite.models.controlnet import HintChain, live_hint_bytes

    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=nets["2.1"][0])
    held = []
    before = HintChain.before

    def watched(self, i, x):
        hint = before(self, i, x)
        if hint is not None:
            held.append((self.c.shape, (self.c.numel() + hint.numel()) * hint.element_size()))
        return hint

    monkeypatch.setattr(HintChain, "before", watched)
    pipe.generate_latents(
        PROMPT, seed=0, steps=1, width=32, height=32, batch=2, control_image=picture(32, 32)
    )
    (batch, tokens, dim), most = max(held, key=lambda h: h[1])  # the main stage: c over the joint tokens
    cfg = pipe.controlnet.config
    assert batch == 2 and dim == cfg.dim
    assert live_hint_bytes(cfg, tokens, batch, 4) == most
    assert live_hint_bytes(cfg, tokens, batch, 4, one_live=False) == most // 2 * (1 + len(cfg.places))


@pytest.mark.parametrize("version", ["v1", "2.1"])
def test_planned_block_order_is_the_order_they_run(tiny, nets, version):
    """The streaming plan's order (execution_order) is the order in which a resident run calls the DiT's
    and the branch's blocks, for v1 (plain control refiner blocks) and 2.1 (refiner-stage hints). 2.0
    runs its control blocks twice per step and is known to stream out of order (see the README)."""
    pipe = Pipeline.load(tiny, device="cpu", dtype="float32", controlnet=nets[version][0])
    planned = execution_order(pipe.transformer, pipe.controlnet)
    dit, net = pipe.transformer, pipe.controlnet
    every = [*dit.noise_refiner, *dit.context_refiner, *dit.layers, *net.control_layers]
    every += list(net.control_noise_refiner or [])  # watched too: a block the plan forgot shows up
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, a: ran.append(m)) for b in every]
    pipe.generate_latents(PROMPT, seed=0, steps=1, width=32, height=32, control_image=picture(32, 32))
    for h in hooks:
        h.remove()
    assert [id(m) for m in ran] == [id(m) for m in planned]
