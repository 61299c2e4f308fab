"""A tiny Qwen3-style tokenizer built offline, for tests and for tiny random models.

It has the real Qwen2/Qwen3 pipeline (NFC normalizer, the Qwen split regex, byte-level BPE without
unknown tokens, byte-level decoder) and the Qwen special tokens, but a vocabulary of a few hundred
entries trained in-process on a built-in text sample, so every Unicode string (Chinese included)
tokenizes. Training is deterministic: the same call writes byte-identical files.

The folder it writes loads with `transformers.AutoTokenizer.from_pretrained(folder)` (tokenizer_class
"Qwen2Tokenizer", like the real Z-Image-Turbo `tokenizer/` folder), and its chat template renders a
single user message exactly like the real Qwen3 template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The pre-tokenization regex of Qwen2/Qwen3 (tokenizer.json "Split" pattern): contractions, letter runs
# with one optional leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Added tokens in Qwen3's order. Qwen3 marks <think>/</think> as non-special added tokens.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# Qwen3-style chat template (system / user / assistant turns, generation prompt, enable_thinking).
# For one user message with add_generation_prompt=True it renders, as the real Qwen3 template does,
# "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n" when thinking is enabled or
# unspecified, and appends an empty "<think>\n\n</think>\n\n" block when enable_thinking is false.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Training text: prompt-like English and Chinese, digits and punctuation, enough for ~250 merges.
_SAMPLE_TEXT = """\
A photograph of a red fox sitting in the snow at sunrise, soft golden light, shallow depth of field.
A cozy reading room with wooden shelves, a green lamp, and a cat sleeping on an old armchair.
Portrait of an elderly fisherman with a grey beard, wearing a yellow raincoat, dramatic lighting.
A futuristic city skyline at night, neon signs reflected in wet streets, cinematic, highly detailed.
An oil painting of a quiet harbour with small boats, calm water, and mountains in the distance.
A bowl of ramen with a soft boiled egg, green onions, and steam rising, studio photo, 50mm lens.
The text "HELLO WORLD" written in chalk on a blackboard, children's drawings around it.
Watercolor illustration of a lighthouse on a cliff during a storm, waves crashing, 4k, 8k, 1024x1024.
一只橘猫坐在窗台上，阳光洒在它的毛上，背景是城市的屋顶。
一位穿着红色汉服的女孩站在樱花树下，微笑着看向远方，画面柔和明亮。
夜晚的上海外滩，灯火辉煌，黄浦江上有游船，摄影作品，高清细节。
山水画风格的风景：远处是高山，近处是小桥流水和人家。
一杯热咖啡放在木桌上，旁边有一本打开的书和一副眼镜。
Mixed prompt: 一只可爱的熊猫 eating bamboo in a forest, 高清, photorealistic, 35mm.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, (brackets), [squares], {braces}, #hash, @at, 100% & more!
It's a dog's life; we're here, they've gone, I'm sure you'll see what he'd done.
"""


def build_synthetic_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE `Tokenizer` with at most `vocab_size` entries, Qwen special tokens included."""
    added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + added:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + added} (256 bytes + added tokens)")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        min_frequency=1,
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    # Repeating lines makes merge counts differ more, so fewer ties are broken by the trainer's order.
    lines = _SAMPLE_TEXT.splitlines()
    tok.train_from_iterator([line for i, line in enumerate(lines) for _ in range(1 + i % 3)], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def write_synthetic_tokenizer(
    folder: str | Path, vocab_size: int = 512, model_max_length: int = 131072
) -> int:
    """Write tokenizer.json and tokenizer_config.json into `folder`; returns the vocabulary size
    (largest id + 1, added tokens included), the `vocab_size` a matching tiny Qwen3 model needs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_synthetic_tokenizer(vocab_size)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    added_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + THINK_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    return tok.get_vocab_size(with_added_tokens=True)
