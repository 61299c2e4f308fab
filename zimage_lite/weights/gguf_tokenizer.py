"""A Qwen byte-level BPE tokenizer <-> the `tokenizer.ggml.*` fields of a llama.cpp GGUF.

llama.cpp stores a GPT-2-style BPE tokenizer as (gguf-py `Keys.Tokenizer`, llama.cpp `llama-vocab.cpp`):
- `tokenizer.ggml.model` = "gpt2" (byte-level BPE) and `tokenizer.ggml.pre` = "qwen2", which selects the
  Qwen2/Qwen3 pre-tokenizer regex (QWEN2_PRE_REGEX below, the same as the tokenizer.json Split pattern);
- `tokenizer.ggml.tokens`: one string per id, for every id of the embedding table; ids the tokenizer
  does not use are filled with "[PAD<id>]" and typed UNUSED, as llama.cpp's converter does;
- `tokenizer.ggml.token_type`: NORMAL (1) for BPE tokens, CONTROL (3) for special added tokens,
  USER_DEFINED (4) for other added tokens, UNUSED (5) for fillers;
- `tokenizer.ggml.merges`: "left right" strings in rank order (byte-level tokens never hold a space);
- `tokenizer.ggml.{bos,eos,padding}_token_id`, `tokenizer.ggml.add_bos_token`, `tokenizer.chat_template`.

Rebuilding gives a `tokenizers.Tokenizer` with the HF Qwen2 pipeline: NFC, the split regex, byte-level
BPE (no unknown token), byte-level decoder, and the added tokens at their ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from zimage_lite.errors import CheckpointError

# llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2 (`tokenizer.ggml.pre` = "qwen2"); equal to Qwen's tokenizer.json.
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
DEFAULT_EOS = "<|im_end|>"
DEFAULT_PAD = "<|endoftext|>"


def _merge_strings(merges: list) -> list[str]:
    # tokenizer.json holds merges as "a b" strings (old) or ["a", "b"] pairs (tokenizers >= 0.20)
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


def _looks_special(token: str) -> bool:
    """llama.cpp's converter types `<|...|>` added tokens CONTROL even when the tokenizer calls them
    non-special (Qwen's `<|fim_prefix|>` ...); we do the same so our files match theirs."""
    return token.startswith("<|") and token.endswith("|>")


def load_tokenizer_files(folder: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """tokenizer.json and (optional) tokenizer_config.json of a tokenizer folder."""
    file = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_str(file.read_text(encoding="utf-8"))  # from_file needs a UTF-8 path
    except Exception as exc:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{file}: not a readable tokenizer.json ({exc})") from None
    cfg_file = folder / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    return tok, config


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config may hold {"content": "...", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_gguf_fields(
    tok: Tokenizer,
    vocab_size: int,
    tokenizer_config: dict[str, Any] | None = None,
    bos_token_id: int | None = None,
) -> dict[str, Any]:
    """The `tokenizer.ggml.*` fields (values for GGUFStreamWriter) for a byte-level BPE tokenizer.

    vocab_size is the embedding table's row count: the token list is padded to it."""
    state = json.loads(tok.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"tokenizer model is {model.get('type')}, only byte-level BPE (Qwen) is supported"
        )
    added = tok.get_added_tokens_decoder()
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a.content for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"tokenizer has id {max(by_id)} but the embedding table only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special or _looks_special(by_id[i])
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    config = tokenizer_config or {}
    eos = tok.token_to_id(_token_text(config.get("eos_token")) or DEFAULT_EOS)
    pad = tok.token_to_id(_token_text(config.get("pad_token")) or DEFAULT_PAD)
    bos = bos_token_id if bos_token_id is not None else tok.token_to_id(DEFAULT_PAD)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ("arr", tokens),
        "tokenizer.ggml.token_type": ("arr", types),
        "tokenizer.ggml.merges": ("arr", _merge_strings(model["merges"])),
        "tokenizer.ggml.add_bos_token": ("bool", False),
    }
    for key, value in (("eos", eos), ("padding", pad), ("bos", bos)):
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = ("u32", int(value))
    template = config.get("chat_template")
    if isinstance(template, str) and template:
        fields["tokenizer.chat_template"] = template
    return fields


def tokenizer_from_gguf(source: Any) -> Tokenizer:
    """Rebuild the tokenizer from a GGUF checkpoint (or a metadata dict)."""
    get = source.field if hasattr(source, "field") else source.get
    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in ("qwen2", None):
        raise CheckpointError(
            f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (expected 'gpt2' / 'qwen2')"
        )
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = get("tokenizer.ggml.merges") or []
    if not tokens or len(types) != len(tokens):
        raise CheckpointError("GGUF tokenizer: token list missing or token_type of a different length")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # added tokens: already in the vocab at their ids, so registering them keeps the ids
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    plain = [
        AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    return tok
