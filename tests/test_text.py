"""Prompt tokenization against transformers' tokenizer rendering the real Qwen3 chat template
(tests/data/templates/, see its README entry), on the synthetic tokenizer's vocabulary.

What diffusers' ZImagePipeline does: apply_chat_template(..., add_generation_prompt=True,
enable_thinking=True), then tokenizer(text, truncation=True, max_length=512).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import transformers

from zimage_lite.errors import CheckpointError
from zimage_lite.synthetic_tokenizer import build_synthetic_tokenizer, write_synthetic_tokenizer
from zimage_lite.text import PromptTokenizer

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()

PROMPTS = {
    "english": "A photograph of a red fox sitting in the snow at sunrise, soft golden light.",
    "chinese": "一只橘猫坐在窗台上，阳光洒在它的毛上。",
    "mixed": "一只可爱的熊猫 eating bamboo, 高清 4k!\n\nNew paragraph\twith a tab.",
    "empty": "",
    "unseen": "Ünïcödé ✨ émojis 🦊 and コンピューター, plus {{ braces }} and <|im_end|> inside.",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_synthetic_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf_tok(folder):
    """transformers' tokenizer of the synthetic folder, rendering the real Qwen3 template (not ours)."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def hf_template(hf_tok, prompt: str, **kw) -> str:
    messages = [{"role": "user", "content": prompt}]
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_template_matches_the_real_qwen3_template_in_transformers(hf_tok, name):
    prompt = PROMPTS[name]
    ours = PromptTokenizer.apply_template(prompt)
    assert ours == hf_template(hf_tok, prompt, enable_thinking=True)
    assert ours == hf_template(hf_tok, prompt)  # thinking unspecified behaves as enabled
    # enable_thinking=False appends an empty think block, as in the real Qwen3 template: not what we use.
    assert hf_template(hf_tok, prompt, enable_thinking=False) == ours + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_ids_match_transformers(folder, hf_tok, name):
    prompt = PROMPTS[name]
    expected = hf_tok(
        hf_template(hf_tok, prompt, enable_thinking=True), truncation=True, max_length=512
    ).input_ids
    assert PromptTokenizer.from_file(folder).encode([prompt]) == [expected]


def test_batch_matches_diffusers_padded_call(folder, hf_tok):
    """diffusers pads the batch to 512 and keeps the masked ids: ours are those ids, unpadded."""
    prompts = list(PROMPTS.values())
    texts = [hf_template(hf_tok, p, enable_thinking=True) for p in prompts]
    batch = hf_tok(texts, padding="max_length", max_length=512, truncation=True)
    expected = [
        [t for t, m in zip(ids, mask) if m] for ids, mask in zip(batch.input_ids, batch.attention_mask)
    ]
    assert PromptTokenizer.from_file(folder).encode(prompts) == expected


def test_truncation_to_512_warns_and_matches_transformers(folder, hf_tok, caplog):
    prompt = " ".join(f"word{i} 猫" for i in range(400))
    text = hf_template(hf_tok, prompt, enable_thinking=True)
    assert len(hf_tok(text).input_ids) > 512
    expected = hf_tok(text, truncation=True, max_length=512).input_ids
    tok = PromptTokenizer.from_file(folder)
    with caplog.at_level(logging.WARNING, logger="zimage_lite.text"):
        ids = tok.encode([PROMPTS["english"], prompt])
    assert len(ids[1]) == 512 and ids[1] == expected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt 1" in warnings[0].getMessage()


def test_no_warning_without_truncation(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="zimage_lite.text"):
        PromptTokenizer.from_file(folder).encode(list(PROMPTS.values()))
    assert not caplog.records


def test_special_tokens_and_ids(folder, hf_tok):
    tok = PromptTokenizer.from_file(folder)
    assert tok.vocab_size == len(hf_tok) == 512
    assert tok.pad_token_id == hf_tok.pad_token_id == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert hf_tok.eos_token == "<|im_end|>"
    ids = tok.encode(["x"])[0]
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in ids
    for t in ("<think>", "</think>"):  # whole tokens, as in Qwen3
        assert len(hf_tok(t).input_ids) == 1


def test_chinese_round_trips(folder):
    tok = PromptTokenizer.from_file(folder)
    ids = tok.encode([PROMPTS["unseen"]])[0]
    assert tok.decode(ids) == PromptTokenizer.apply_template(PROMPTS["unseen"])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_synthetic_template_renders_one_turn_like_the_real_one(folder, hf_tok, name):
    """The synthetic folders' own template (what diffusers renders in the parity tests) gives the real
    template's text for ZImagePipeline's call, so those tests condition as the real model would."""
    synthetic = transformers.AutoTokenizer.from_pretrained(folder)
    assert synthetic.chat_template != QWEN3_TEMPLATE
    for thinking in (True, False):
        assert hf_template(synthetic, PROMPTS[name], enable_thinking=thinking) == hf_template(
            hf_tok, PROMPTS[name], enable_thinking=thinking
        )


def test_synthetic_tokenizer_is_deterministic(folder, tmp_path):
    assert write_synthetic_tokenizer(tmp_path) == 512
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|endoftext|>" and "chat_template" in config


def test_constructed_from_tokenizer_object():
    tok = PromptTokenizer(build_synthetic_tokenizer(300))
    assert tok.vocab_size == 300
    assert tok.encode("a")[0][0] == tok.tokenizer.token_to_id("<|im_start|>")


def test_from_file_accepts_file_folder_and_model_root(folder, tmp_path):
    ids = PromptTokenizer.from_file(folder / "tokenizer.json").encode(["cat"])
    assert PromptTokenizer.from_file(folder).encode(["cat"]) == ids
    write_synthetic_tokenizer(tmp_path / "tokenizer")
    assert PromptTokenizer.from_file(tmp_path).encode(["cat"]) == ids
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        PromptTokenizer.from_file(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        PromptTokenizer.from_file(tmp_path / "bad.json")
