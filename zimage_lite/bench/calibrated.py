"""The bench's calibrated rows (issue 26), converted by the same cached `convert` as the plain rows.

- `--imatrix FILE`: a `<precision>+imatrix` row after each GGUF precision's plain row, converted with
  `convert --imatrix FILE` (cache key: the file's content hash), compared with the reference like every row.
- `--target-size SIZE`: a `target:<SIZE>` row converted with `convert --target-size SIZE` (and the imatrix
  when given); its GGUF bytes are reported next to the target so it can be set against the preset of that size.
- `--tensor-type-rules RULES`: a `<precision>+rules` row after each GGUF precision's rows, converted with
  `convert --tensor-type-rules RULES` (and the imatrix when given), e.g. the refiners kept in BF16.

The imatrix is a file: gathering one (`zimage-lite imatrix`) runs generations, which the bench does not
hide inside a row's conversion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from zimage_lite.bench import sources
from zimage_lite.bench.rows import RowResult
from zimage_lite.errors import UsageError, ZImageError

log = logging.getLogger(__name__)

# fp8 is not a GGUF type and ggml quantizes Q8_0 without the imatrix: their +imatrix rows would repeat them
NO_IMATRIX = (sources.REFERENCE, "fp8", "q8_0")


def imatrix_setting(path: str | None) -> dict | None:
    """{"file", "sha256", "dataset", "entries", "chunks"} of a readable imatrix file, or None."""
    if path is None:
        return None
    from zimage_lite.weights.imatrix_io import read_imatrix

    try:
        imatrix = read_imatrix(path)
    except ZImageError as exc:
        raise UsageError(f"--imatrix: {exc}") from None
    except (OSError, ValueError, EOFError, KeyError, IndexError) as exc:
        raise UsageError(f"--imatrix {path}: not an imatrix file ({type(exc).__name__}: {exc})") from None
    return {
        "file": str(Path(path).expanduser().resolve()),
        "sha256": sources.file_sha256(Path(path).expanduser()),
        "dataset": imatrix.datasets[0] if imatrix.datasets else "",
        "entries": len(imatrix.entries),
        "chunks": imatrix.chunks,
    }


def target_sizes(texts: list[str] | None) -> list[str]:
    """--target-size values (repeatable, or comma lists), each checked as convert checks it."""
    from zimage_lite.cli_imatrix import parse_target_size

    sizes = [t.strip() for text in texts or [] for t in text.split(",") if t.strip()]
    for size in sizes:
        parse_target_size(size)
    return list(dict.fromkeys(sizes))


def takes_imatrix(precision: str) -> bool:
    return precision not in NO_IMATRIX and precision not in sources.VARIANTS


def plain_and_imatrix_rows(precisions: list[str], imatrix: dict | None, rules: str | None) -> list[RowResult]:
    """Each precision's row, followed by its +imatrix row where the imatrix changes the bytes and its
    +rules row (with the imatrix when given) where it is a GGUF."""
    rows = []
    for p in precisions:
        rows.append(RowResult(p, "zimage-lite", p))
        if imatrix is not None and takes_imatrix(p):
            rows.append(RowResult(f"{p}+imatrix", "zimage-lite", p, imatrix=True))
        if rules is not None and takes_rules(p):
            rows.append(RowResult(f"{p}+rules", "zimage-lite", p, imatrix=imatrix is not None, rules=True))
    return rows


def takes_rules(precision: str) -> bool:
    return precision not in (sources.REFERENCE, "fp8") and precision not in sources.VARIANTS


def tensor_type_rules(text: str | None) -> str | None:
    """--tensor-type-rules, checked as convert checks it."""
    if text is None:
        return None
    from zimage_lite.convert.recipe import parse_rules

    parse_rules(text)
    return text


def target_rows(sizes: list[str], imatrix: dict | None) -> list[RowResult]:
    return [
        RowResult(f"target:{s}", "zimage-lite", f"target:{s}", target_size=s, imatrix=imatrix is not None)
        for s in sizes
    ]


def check(precisions: list[str], sizes: list[str], imatrix: dict | None, rules: str | None) -> None:
    if rules is not None and not any(takes_rules(p) for p in precisions):
        raise UsageError("--tensor-type-rules needs a GGUF precision (q8_0, q4_k_m, ...) in --precisions")
    if imatrix is not None and not sizes and not any(takes_imatrix(p) for p in precisions):
        raise UsageError(
            f"--imatrix needs a K-quant or Q4_0 precision in --precisions or a --target-size "
            f"({', '.join(NO_IMATRIX)} ignore it)"
        )


def recipe_options(imatrix: dict | None, row: RowResult, rules: str | None = None):
    """The convert.recipe.RecipeOptions a row converts with; None for a plain row."""
    if not row.imatrix and row.target_size is None and not row.rules:
        return None
    from zimage_lite.cli_imatrix import parse_target_size
    from zimage_lite.convert.recipe import RecipeOptions

    target = None if row.target_size is None else parse_target_size(row.target_size)
    return RecipeOptions(Path(imatrix["file"]) if row.imatrix else None, rules if row.rules else None, target)


def recipe_record(
    folder: Path, imatrix: dict | None, row: RowResult, rules: str | None = None
) -> dict | None:
    """What the report shows of how a calibrated row's files were made (None for a plain row)."""
    options = recipe_options(imatrix, row, rules)
    if options is None:
        return None
    from zimage_lite.weights.components import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    recipe = manifest.get("recipe") or {}
    types = recipe.get("types") or {}
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return {
        "imatrix_sha256": imatrix["sha256"] if row.imatrix else None,
        "imatrix_tensors": (manifest.get("imatrix") or {}).get("tensors"),
        "rules": options.rules,
        "target_size": row.target_size,
        "target_bytes": options.target_size,
        "planned_bytes": recipe.get("planned_bytes"),
        "gguf_bytes": sum(p.stat().st_size for p in folder.rglob("*.gguf")),
        "types": dict(sorted(counts.items(), key=lambda kv: -kv[1])) or None,
    }


def markdown_lines(rows: list[dict], imatrix: dict | None) -> list[str]:
    """report.md's section on the calibrated rows: the imatrix, and each row's recipe and GGUF bytes."""
    calibrated = [r for r in rows if r["status"] == "ok" and r.get("recipe")]
    if not calibrated:
        return []
    lines = [""]
    if imatrix is not None:
        lines += [
            f"Importance matrix: `{Path(imatrix['file']).name}` (sha256 {imatrix['sha256'][:12]}, dataset "
            f"{imatrix['dataset'] or '–'}, {imatrix['entries']} entries, {imatrix['chunks']} chunks); "
            "`+imatrix` rows are the same preset quantized with it.",
            "",
        ]
    lines += [
        "| row | imatrix | rules | target | GGUF bytes | imatrix tensors | types chosen |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in calibrated:
        rec = r["recipe"]
        types = ", ".join(f"{k} x{v}" for k, v in (rec["types"] or {}).items()) or "the preset's"
        target = f"{rec['target_size']} ({rec['target_bytes']} B)" if rec["target_size"] else "–"
        rules = f"`{rec['rules']}`" if rec.get("rules") else "–"
        cells = [r["name"], "yes" if rec["imatrix_sha256"] else "no", rules, target, str(rec["gguf_bytes"]),
                 str(rec["imatrix_tensors"] or 0), types]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines
