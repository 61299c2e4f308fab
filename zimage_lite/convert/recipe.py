"""Per-tensor recipes on top of a preset: `--tensor-type-rules` (stable-diffusion.cpp's syntax) and
`--target-size` (types chosen by measured sensitivity to fit a size).

- Rules: "regex=type,regex=type": the first regex found (re.search) in a tensor's name (ours, or
  stable-diffusion.cpp's `model.diffusion_model.` / `text_encoders.llm.model.` name, so sd.cpp rules work
  as written) sets its type (q8_0, q4_k, q3_k, bf16, f16, f32...); block fit falls back as the presets do.
  Applies to the tensors a preset may quantize (2-D, more than 1024 elements), not the pad tokens.
- Target size: every tensor a preset quantizes (not the "keep" roles, which stay BF16, nor small ones) is a
  candidate. Its sensitivity at each type of LADDER is the importance-weighted relative squared error
  sum_j imatrix_j * sum_i (W_ij - Q(W)_ij)^2 / sum_j imatrix_j * sum_i W_ij^2 (imatrix_j = 1 without an
  imatrix), measured by quantizing SAMPLE_ROWS evenly spaced rows with ggml (and the imatrix, as the
  converter will) and dequantizing them. The types with the least total error whose GGUF files (header,
  fixed tensors, 32-byte alignment: the bytes on disk) fit the size are chosen by marginal error per byte
  along each tensor's lower convex hull, then a last pass spends what is left. Rules fix their tensors first.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_lite.convert.plan import PAD_TOKENS, ComponentPlan
from zimage_lite.convert.stream import Job, OutTensor
from zimage_lite.errors import UsageError

log = logging.getLogger(__name__)

LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16")
SHORT_ROW_LADDER = ("Q4_0", "Q8_0", "BF16")  # rows that are not a multiple of 256
SAMPLE_ROWS = 256
HEADER_MARGIN_BYTES = 4096  # metadata added after the choice: quantizer, imatrix and recipe records
RECIPE_KEY = "zimage_lite.recipe"
RULE_TYPES = ("F32", "F16", "BF16")  # plus every type ggml writes (formats.quantizable_types)


# -- rules ---------------------------------------------------------------------------------------------------
def parse_rules(text: str) -> tuple[tuple[str, str], ...]:
    """ "regex=type,..." -> ((regex, TYPE), ...); one error line for a bad regex or type."""
    from zimage_lite.quant.formats import quantizable_types

    allowed = (*quantizable_types(), *RULE_TYPES)
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, qtype = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"tensor type rule {item!r} is not regex=type")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"tensor type rule {item!r}: bad regex ({exc})") from None
        if qtype.upper() not in allowed:
            raise UsageError(
                f"tensor type rule {item!r}: unknown type (choose from {', '.join(allowed).lower()})"
            )
        rules.append((pattern, qtype.upper()))
    if not rules:
        raise UsageError("--tensor-type-rules has no rules")
    return tuple(rules)


def eligible(job: Job) -> bool:
    """A tensor a recipe may retype: 2-D or more, over 1024 elements, not a pad token."""
    from zimage_lite.quant.policy import SMALL_TENSOR_ELEMENTS

    return len(job.shape) >= 2 and math.prod(job.shape) > SMALL_TENSOR_ELEMENTS and job.name not in PAD_TOKENS


def set_type(job: Job, qtype: str) -> None:
    from zimage_lite.quant.policy import fit_to_row

    job.qtype = fit_to_row(qtype, job.shape[-1])
    job.outputs = [OutTensor(job.name, tuple(job.shape), job.qtype)]


def apply_rules(plan: ComponentPlan, rules: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Retype the plan's tensors the rules match; returns {name: type} of those."""
    from zimage_lite.weights.imatrix_io import to_sdcpp_name

    if plan.container != "gguf":
        raise UsageError("--tensor-type-rules and --target-size make GGUF files (not fp8)")
    fixed = {}
    for job in plan.jobs:
        if not eligible(job):
            continue
        names = (job.name, to_sdcpp_name(job.name))
        rule = next((r for r in rules if any(re.search(r[0], n) for n in names)), None)
        if rule is not None:
            set_type(job, rule[1])
            fixed[job.name] = job.qtype
    return fixed


# -- sensitivity ---------------------------------------------------------------------------------------------
def ladder(row: int) -> tuple[str, ...]:
    return LADDER if row % 256 == 0 else SHORT_ROW_LADDER if row % 32 == 0 else ("BF16",)


def _sample(w: torch.Tensor) -> torch.Tensor:
    rows = w.reshape(-1, w.shape[-1])
    if rows.shape[0] <= SAMPLE_ROWS:
        return rows.float()
    idx = torch.linspace(0, rows.shape[0] - 1, SAMPLE_ROWS).round().long().unique()
    return rows[idx].float()


def tensor_errors(w: torch.Tensor, types: tuple[str, ...], imatrix: torch.Tensor | None) -> dict[str, float]:
    """{type: importance-weighted relative squared error} of `w`'s sampled rows (module docstring)."""
    from zimage_lite.convert.calibrated import uses_imatrix
    from zimage_lite.quant.formats import dequantize, quantize

    rows = _sample(w).contiguous()
    weights = torch.ones(rows.shape[1]) if imatrix is None else imatrix.float()
    denom = float((rows.double().square() * weights.double()).sum()) or 1.0
    errors = {}
    for t in types:
        if t == "BF16":
            back = rows.bfloat16().float()
        else:
            raw = quantize(rows, t, imatrix=imatrix if imatrix is not None and uses_imatrix(t) else None)
            back = dequantize(raw, t, tuple(rows.shape))
        errors[t] = float(((rows - back).double().square() * weights.double()).sum()) / denom
    return errors


@dataclass
class Candidate:
    plan: ComponentPlan
    job: Job
    options: list[tuple[str, int, float]]  # (type, file bytes, error), by bytes


def _measure(job: Job, imatrix) -> dict[str, float]:
    try:
        w = job.load()
        values = None if imatrix is None else imatrix.values(job.name)
        if values is not None and values.numel() != job.shape[-1]:
            values = None  # calibrated.attach names the mismatch
        return tensor_errors(w, ladder(job.shape[-1]), values)
    finally:
        if job.release is not None:
            job.release()


def measure(plans: list[ComponentPlan], fixed: set[str], imatrix, threads: int | None) -> list[Candidate]:
    """Every retypable tensor a preset would quantize and no rule fixed, with its options measured."""
    from zimage_lite.preflight import output_tensor_bytes
    from zimage_lite.quant.policy import role_of

    jobs = [
        (plan, job) for plan in plans for job in plan.jobs
        if eligible(job) and job.name not in fixed and role_of(job.name, plan.component) != "keep"
    ]  # fmt: skip
    with ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1)) as pool:
        measured = list(pool.map(lambda pj: _measure(pj[1], imatrix), jobs))
    out = []
    for (plan, job), errors in zip(jobs, measured):
        options = sorted(
            ((t, output_tensor_bytes("gguf", tuple(job.shape), t), e) for t, e in errors.items()),
            key=lambda o: o[1],
        )
        out.append(Candidate(plan, job, options))
    return out


# -- choice --------------------------------------------------------------------------------------------------
def _hull(options: list[tuple[str, int, float]]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), from the smallest option (error falling)."""
    hull: list[int] = []
    for i, (_, b, e) in enumerate(options):
        if hull and e >= options[hull[-1]][2]:
            continue  # more bytes, no less error: never worth it
        while len(hull) >= 2:
            (_, b1, e1), (_, b2, e2) = options[hull[-2]], options[hull[-1]]
            if (e1 - e2) * (b - b2) <= (e2 - e) * (b2 - b1):  # the middle point is not convex
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def choose(candidates: list[Candidate], budget: int) -> dict[int, int]:
    """{candidate index: option index} with the least total error whose bytes fit `budget`."""
    pick = {i: 0 for i in range(len(candidates))}
    used = sum(c.options[0][1] for c in candidates)
    if used > budget:
        raise UsageError(f"the smallest types need {used - budget} bytes more than the target leaves")
    hulls = [_hull(c.options) for c in candidates]
    pos = dict.fromkeys(range(len(candidates)), 0)
    heap = []

    def push(i: int) -> None:
        h = hulls[i]
        if pos[i] + 1 < len(h):
            (_, b0, e0), (_, b1, e1) = candidates[i].options[h[pos[i]]], candidates[i].options[h[pos[i] + 1]]
            heapq.heappush(heap, (-(e0 - e1) / max(b1 - b0, 1), i))

    for i in pick:
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h = hulls[i]
        extra = candidates[i].options[h[pos[i] + 1]][1] - candidates[i].options[h[pos[i]]][1]
        if used + extra > budget:
            continue  # this tensor's next step does not fit; others' may
        used += extra
        pos[i] += 1
        pick[i] = h[pos[i]]
        push(i)
    return _spend_rest(candidates, pick, budget - used)


def _spend_rest(candidates: list[Candidate], pick: dict[int, int], left: int) -> dict[int, int]:
    """Off-hull steps that still fit, best error drop first."""
    while True:
        best = None
        for i, c in enumerate(candidates):
            _, b0, e0 = c.options[pick[i]]
            for j, (_, b, e) in enumerate(c.options):
                if b > b0 and b - b0 <= left and e < e0 and (best is None or e0 - e > best[0]):
                    best = (e0 - e, i, j, b - b0)
        if best is None:
            return pick
        _, i, j, extra = best
        pick[i], left = j, left - extra


# -- file bytes ------------------------------------------------------------------------------------------------
def header_bytes(plan: ComponentPlan) -> int:
    """The GGUF header as written (metadata, tensor infos, padding): types do not change its size."""
    from zimage_lite.weights.gguf_writer import GGUFStreamWriter

    with tempfile.TemporaryDirectory(prefix="zimage-header-") as folder:
        path = Path(folder) / "h.gguf"
        writer = GGUFStreamWriter(path, plan.architecture, plan.metadata)
        for o in plan.outputs:
            writer.add(o.name, o.shape, o.storage)
        writer.begin()
        writer.abort()
        return path.stat().st_size + HEADER_MARGIN_BYTES


def gguf_bytes(plans: list[ComponentPlan], skip: set[int] = frozenset()) -> int:
    """File bytes of the GGUF plans, leaving out the jobs whose id() is in `skip`."""
    from zimage_lite.preflight import output_tensor_bytes

    total = 0
    for plan in plans:
        total += header_bytes(plan)
        total += sum(
            output_tensor_bytes("gguf", o.shape, o.storage)
            for j in plan.jobs
            if id(j) not in skip
            for o in j.outputs
        )
    return total


# -- the recipe --------------------------------------------------------------------------------------------------
def make_recipe(
    plans: list[ComponentPlan],
    rules: str | None,
    target_size: int | None,
    imatrix,
    threads: int | None = None,
) -> dict | None:
    """Retype the GGUF plans in place per the rules and the target size; returns the record for the
    manifest (None when there is no recipe)."""
    if rules is None and target_size is None:
        return None
    ggufs = [p for p in plans if p.container == "gguf"]
    fixed: dict[str, str] = {}
    parsed = parse_rules(rules) if rules else ()
    for plan in ggufs:
        fixed.update(apply_rules(plan, parsed) if parsed else {})
    record: dict = {"rules": rules, "fixed_by_rules": len(fixed)}
    if target_size is not None:
        record.update(_fit(ggufs, set(fixed), target_size, imatrix, threads))
    for plan in ggufs:
        summary = {**record, "types": dict(Counter(j.qtype for j in plan.jobs))}
        plan.metadata[RECIPE_KEY] = json.dumps(summary, sort_keys=True)
        if target_size is not None:
            plan.metadata.pop("general.file_type", None)  # a mixture, no llama.cpp file type
    record["types"] = {j.name: j.qtype for p in ggufs for j in p.jobs if eligible(j)}
    return record


def _fit(plans: list[ComponentPlan], fixed: set[str], target: int, imatrix, threads: int | None) -> dict:
    candidates = measure(plans, fixed, imatrix, threads)
    fixed_bytes = gguf_bytes(plans, skip={id(c.job) for c in candidates})
    budget = target - fixed_bytes
    if budget <= 0:
        raise UsageError(
            f"--target-size {target} bytes: the tensors no recipe changes take {fixed_bytes} already"
        )
    try:
        pick = choose(candidates, budget)
    except UsageError as exc:
        raise UsageError(f"--target-size {target} bytes is too small: {exc}") from None
    error = 0.0
    for i, c in enumerate(candidates):
        qtype, _, e = c.options[pick[i]]
        set_type(c.job, qtype)
        error += e
    planned = gguf_bytes(plans)
    log.info(
        "target %d bytes: planned %d, %d tensors chosen, total error %.4g",
        target,
        planned,
        len(candidates),
        error,
    )
    return {
        "target_size": target,
        "planned_bytes": planned,
        "objective": "sum of importance-weighted relative squared errors (sampled rows)",
        "estimated_error": error,
        "imatrix": imatrix is not None,
    }


@dataclass(frozen=True)
class RecipeOptions:
    """What `convert` does beyond its preset: an imatrix file, sd.cpp-style rules, a target size (bytes)."""

    imatrix: Path | None = None
    rules: str | None = None
    target_size: int | None = None

    def any(self) -> bool:
        return self.imatrix is not None or self.rules is not None or self.target_size is not None


def apply(plans: list[ComponentPlan], options: RecipeOptions, device, quantizer, threads) -> dict:
    """Retype (rules, target size) and calibrate (imatrix) the plans in place before anything is written;
    returns what the manifest records."""
    from zimage_lite.convert import calibrated

    imatrix = calibrated.load(options.imatrix, device, quantizer) if options.imatrix is not None else None
    if options.target_size is not None or options.rules is not None:
        check_ggml(device, quantizer)
    record = {}
    recipe = make_recipe(plans, options.rules, options.target_size, imatrix, threads)
    if recipe is not None:
        record["recipe"] = recipe
    if imatrix is not None:
        used = sum(calibrated.attach(plan, imatrix, options.imatrix) for plan in plans)
        record["imatrix"] = {**calibrated.summary(imatrix, options.imatrix), "tensors": used}
    return record


def check_ggml(device, quantizer) -> None:
    """Recipes measure and write with ggml's quantizers (Q3_K/Q2_K have no other)."""
    from zimage_lite.convert.calibrated import check_quantizer

    try:
        check_quantizer(device, quantizer)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--imatrix", "--tensor-type-rules / --target-size")) from None
