"""Model variants: defaults and scheduler from the model's files (scheduler config, manifest), carried by
`synthetic --variant`, `convert`, `inspect` and the PNG metadata, overridden by flags; prompts that give
no tokens refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models

from zimage_lite.cli import main
from zimage_lite.errors import UsageError
from zimage_lite.inspect import inspect_path
from zimage_lite.models.dit import ZImageDiT
from zimage_lite.sampling import turbo_sigmas
from zimage_lite.variants import VARIANTS, read_variant


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "base"
    assert main(["synthetic", str(out), "--variant", "base"]) == 0
    return out


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "base-q8"
    assert main(["convert", str(base), "-o", str(out), "--quant", "q8_0", "-q"]) == 0
    return out


def _scheduler(folder, **values):
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(values))


def test_variant_from_the_scheduler_shift(base, tmp_path):
    v = read_variant(base)
    assert (v.name, v.scheduler.shift, v.decided_by) == ("base", 6.0, "the scheduler's shift")
    _scheduler(tmp_path / "turbo", shift=3.0, num_train_timesteps=1000)
    assert read_variant(tmp_path / "turbo").name == "turbo"
    _scheduler(tmp_path / "odd", shift=4.5)  # a fine-tune's own shift: Turbo defaults, its shift kept
    v = read_variant(tmp_path / "odd")
    assert (v.name, v.scheduler.shift) == ("turbo", 4.5)
    assert read_variant(None).scheduler.shift == 3.0  # single files: the Turbo scheduler
    assert read_variant(None, "base").scheduler.shift == 6.0
    assert read_variant(base, "turbo").name == "turbo"  # the caller decides over the files


def test_sigmas_follow_the_read_shift(base):
    """The schedule is the scheduler config's, not Turbo's (diffusers' scheduler for comparison)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(str(base / "scheduler"))
    ref.set_timesteps(sigmas=torch.linspace(1.0, 1 / 10, 10).tolist())
    ours = turbo_sigmas(10, read_variant(base).scheduler)
    assert torch.equal(ours, ref.sigmas.float())
    assert not torch.equal(ours, turbo_sigmas(10))


def test_bad_scheduler_and_manifest_are_refused(tmp_path):
    _scheduler(tmp_path / "dyn", shift=6.0, use_dynamic_shifting=True)
    with pytest.raises(Exception, match="dynamic shifting"):
        read_variant(tmp_path / "dyn")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "zimage-lite.json").write_text(json.dumps({"variant": "xl"}))
    with pytest.raises(UsageError, match="unknown model variant 'xl'"):
        read_variant(tmp_path / "m")


def test_convert_carries_the_variant_and_inspect_shows_it(converted, capsys):
    manifest = json.loads((converted / "zimage-lite.json").read_text())
    assert manifest["variant"] == "base"
    # the manifest decides even without the scheduler folder
    (converted / "scheduler" / "scheduler_config.json").rename(converted / "scheduler.json.off")
    try:
        report = inspect_path(converted)
        assert report["variant"]["name"] == "base" and report["variant"]["decided_by"] == "the manifest"
        assert main(["inspect", str(converted)]) == 0
        assert "variant: base (decided by the manifest" in capsys.readouterr().out
    finally:
        (converted / "scheduler.json.off").rename(converted / "scheduler" / "scheduler_config.json")


def test_png_metadata_has_the_defaults_and_flags_override(converted, tmp_path):
    out = tmp_path / "a.png"
    args = [
        "generate",
        "a cat",
        "--model",
        str(converted),
        "--width",
        "32",
        "--height",
        "32",
        "-q",
        "--force",
    ]  # one file, rewritten
    assert main([*args, "--steps", "2", "-o", str(out)]) == 0
    text = Image.open(out).text
    d = VARIANTS["base"]
    assert (text["variant"], text["steps"], text["guidance"]) == ("base", "2", f"{d.guidance:g}")
    assert text["negative_prompt"] == "" and text["cfg_truncation"] == "1"
    flags = ["--steps", "3", "--guidance", "0", "--negative-prompt", "ignored", "-o", str(out)]
    assert main([*args, *flags, "--stats", str(tmp_path / "s.json")]) == 0
    text = Image.open(out).text
    assert (text["steps"], text["guidance"]) == ("3", "0") and "negative_prompt" not in text
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["steps"] == 3 and len(stats["steps_s"]) == 3 and stats["guidance"] == 0.0
    assert main([*args, "--variant", "turbo", "--steps", "1", "-o", str(out)]) == 0
    assert Image.open(out).text["variant"] == "turbo"


def test_guidance_with_hires_fix_and_cli_errors(base, tmp_path, capsys):
    out = tmp_path / "h.png"
    args = [
        "generate",
        "a cat",
        "--model",
        str(base),
        "--width",
        "32",
        "--height",
        "32",
        "-q",
        "--steps",
        "2",
    ]
    assert (
        main([*args, "--guidance", "3", "--cfg-normalization", "1.5", "--hires", "1.5", "-o", str(out)]) == 0
    )
    text = Image.open(out).text
    assert Image.open(out).size == (48, 48) and text["cfg_normalization"] == "1.5"
    capsys.readouterr()
    assert main([*args, "--guidance", "-2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance" in err[0] and ">= 0" in err[0]


def _empty_tokenizer(path):
    Tokenizer(models.BPE(vocab={}, merges=[])).save(str(path))  # every text tokenizes to nothing
    return path


def test_prompt_without_tokens_is_one_line(base, tmp_path, capsys):
    tok = _empty_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "e.png"
    code = main(["generate", "a cat", "--model", str(base), "--tokenizer", str(tok), "--width", "32",
                 "--height", "32", "-q", "-o", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "gives no tokens" in err[0] and "internal error" not in err[0]
    assert not out.exists()


def test_dit_refuses_an_empty_caption_by_name():
    """diffusers' transformer fails in a reshape for a caption without tokens; ours says which caption."""
    from zimage_lite.synthetic import SIZES

    dit = ZImageDiT(SIZES["tiny"]().dit).eval()
    caps = [torch.randn(5, dit.config.cap_feat_dim), torch.zeros(0, dit.config.cap_feat_dim)]
    with pytest.raises(ValueError, match="caption 1 has no tokens"):
        dit(torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.5]), caps)
