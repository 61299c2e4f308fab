"""Prompt -> token ids, exactly as diffusers' ZImagePipeline computes them.

The pipeline renders each prompt with the Qwen3 chat template
(`apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
enable_thinking=True)`), which for one user message is
`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` (thinking enabled adds nothing; only
enable_thinking=False appends an empty think block), then tokenizes with truncation to 512 tokens.
Padding is not needed here: the text encoder is causal, so the real tokens' states do not depend on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer

from zimage_lite.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 512
PAD_TOKEN = "<|endoftext|>"


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be UTF-8: a shell passes bytes that are not UTF-8 to Python as lone
    surrogates (U+DC80..U+DCFF for the bytes 0x80..0xFF), which the tokenizer cannot take. Replacing them
    would condition on a prompt the user never typed, so it is an error naming the first bad byte."""
    if not isinstance(text, str):
        raise UsageError(f"{what} must be text (got {type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UsageError(
            f"{what} is not valid UTF-8 text ({byte} at character {exc.start}): type it again, or set a "
            "UTF-8 locale (LANG=C.UTF-8)"
        ) from None


class PromptTokenizer:
    """A Qwen3 `tokenizers.Tokenizer` plus the chat template Z-Image conditions on."""

    def __init__(self, tokenizer: Tokenizer):
        # Truncation and padding are ours to do (a tokenizer.json may carry its own settings).
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTokenizer:
        """Load a tokenizer.json, or the one in a folder (a `tokenizer/` folder or a model root above it)."""
        path = Path(path)
        candidates = (
            [path] if path.is_file() else [path / "tokenizer.json", path / "tokenizer" / "tokenizer.json"]
        )
        for file in candidates:
            if file.is_file():
                try:  # from the text: tokenizers' from_file cannot open a path that is not UTF-8
                    return cls(Tokenizer.from_str(file.read_text(encoding="utf-8")))
                except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
                    raise CheckpointError(f"{file}: not a readable tokenizer.json ({exc})") from None
        raise CheckpointError(f"{path}: no tokenizer.json found")

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.token_to_id(PAD_TOKEN)

    @staticmethod
    def apply_template(prompt: str) -> str:
        """The Qwen3 chat template for one user turn with a generation prompt, thinking enabled."""
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, prompts: list[str] | str, max_length: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
        """Token ids of each templated prompt, cut to the first `max_length` (as transformers'
        `truncation=True` does, so a long prompt loses its template tail too)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for i, prompt in enumerate(prompts):
            check_text(prompt, f"prompt {i}" if len(prompts) > 1 else "the prompt")
        texts = [self.apply_template(p) for p in prompts]
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = []
        for i, enc in enumerate(encoded):
            if len(enc.ids) > max_length:
                log.warning(
                    "prompt %d is %d tokens long with its chat template; only the first %d are used",
                    i,
                    len(enc.ids),
                    max_length,
                )
            ids.append(list(enc.ids[:max_length]))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
