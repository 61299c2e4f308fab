"""Find the components of a model: a diffusers folder, a converted folder (manifest), or a hub repo id.

Single-file overrides (`--transformer F`, `--text-encoder F`, `--vae F`) replace what the folder gives.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from zimage_lite.errors import CheckpointError, not_found

log = logging.getLogger(__name__)

MANIFEST = "zimage-lite.json"  # written by `zimage-lite convert` for a whole model folder
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae")


@dataclass(frozen=True)
class ModelPaths:
    transformer: Path
    text_encoder: Path
    tokenizer: Path
    vae: Path
    root: Path | None = None  # the model folder, when there is one (its scheduler/ and manifest)

    def describe(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in COMPONENTS}


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return (
        len(parts) == 2 and all(parts) and not Path(model).exists() and not model.startswith((".", "/", "~"))
    )


def _download(repo_id: str) -> Path:
    """Fetch a diffusers-layout repo with huggingface_hub (needs network; cached by the hub)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer*"])
        )
    except Exception as exc:  # the hub raises many types: offline, 404, auth
        raise CheckpointError(
            f"cannot fetch {repo_id} from the Hugging Face hub: {exc}".splitlines()[0]
        ) from None


def _from_folder(root: Path) -> ModelPaths:
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["components"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from None
        paths = {k: root / entries[k] for k in COMPONENTS if k in entries}
    else:
        paths = {k: root / k for k in COMPONENTS}
    # a GGUF text encoder carries its own tokenizer
    if "tokenizer" not in paths and str(paths.get("text_encoder", "")).endswith(".gguf"):
        paths["tokenizer"] = paths["text_encoder"]
    return ModelPaths(**{k: paths.get(k, root / k) for k in COMPONENTS}, root=root)


def resolve_model(
    model: str | Path | None,
    transformer: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> ModelPaths:
    """Component paths; every one must exist (a clear error names the first that does not)."""
    overrides = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    if model is None:
        missing = [k for k in ("transformer", "text_encoder", "vae") if overrides[k] is None]
        if missing:
            raise CheckpointError(f"no --model folder given, so --{missing[0].replace('_', '-')} is required")
        te = Path(text_encoder)  # type: ignore[arg-type]
        if tokenizer is None and te.suffix != ".gguf":
            raise CheckpointError(
                "no --model folder given, so --tokenizer is required (unless the text encoder is a GGUF)"
            )
        paths = ModelPaths(Path(transformer), te, Path(tokenizer) if tokenizer else te, Path(vae))  # type: ignore[arg-type]
    else:
        model = str(model)
        root = _download(model) if _looks_like_repo_id(model) else Path(model).expanduser()
        if root.is_file():
            raise CheckpointError(
                f"{root} is a file, not a model folder: give single files with --transformer, --text-encoder "
                "and --vae"
            )
        if not root.is_dir():
            raise not_found(root, "model folder")
        paths = _from_folder(root)
        paths = replace(paths, **{k: Path(v) for k, v in overrides.items() if v is not None})
        if text_encoder is not None and tokenizer is None and str(text_encoder).endswith(".gguf"):
            paths = replace(paths, tokenizer=Path(text_encoder))
    for name in COMPONENTS:
        p = getattr(paths, name)
        if not p.exists():
            raise CheckpointError(f"{p}: {name.replace('_', ' ')} not found")
    return paths
