"""The fixed prompt set of the benchmark: the kinds of prompt where quantization damage shows first.

Kept fixed (ids never reused) so that reports from different machines and versions compare. `--prompts N`
takes the first N, so the order interleaves the kinds: the first five cover all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zimage_lite.errors import UsageError


@dataclass(frozen=True)
class BenchPrompt:
    id: str  # short, stable, ASCII: used in file names and grid labels
    kind: str  # short | long | chinese | mixed | text
    text: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


PROMPTS: tuple[BenchPrompt, ...] = (
    BenchPrompt("short-cat", "short", "a cat sleeping on a windowsill"),
    BenchPrompt(
        "long-market",
        "long",
        "A bustling night market in a narrow old-town street after rain, glowing paper lanterns in red and "
        "amber strung overhead, steam rising from food stalls, wet cobblestones reflecting neon signs, a "
        "vendor in a blue apron handing skewers to a child in a yellow raincoat, shallow depth of field, "
        "35mm film photograph, soft grain, cinematic colour grading",
    ),
    BenchPrompt(
        "zh-mountain", "chinese", "水墨画风格的山水，远处是云雾缭绕的群山，近处有一叶小舟和垂钓的老人"
    ),
    BenchPrompt(
        "mixed-cafe", "mixed", "a cozy café interior, 窗外下着小雨, warm light, 木质桌子上放着一杯拿铁"
    ),
    BenchPrompt(
        "text-sign",
        "text",
        'a hand-painted wooden shop sign that reads "OPEN 24 HOURS" above a small bakery door, morning light',
    ),
    BenchPrompt(
        "long-portrait",
        "long",
        "Studio portrait of an elderly fisherman with a weathered face and a white beard, wearing a knitted "
        "navy sweater, rim lighting from the left, dark grey backdrop, every wrinkle and strand of hair in "
        "sharp detail, 85mm lens, f/2.8, high dynamic range",
    ),
    BenchPrompt("zh-text", "text", '红色的春节海报，中间写着金色的大字"新年快乐"，周围是烟花和灯笼'),
    BenchPrompt("short-robot", "short", "a small robot watering a plant, isometric 3d render"),
)

KINDS: tuple[str, ...] = ("short", "long", "chinese", "mixed", "text")


def bench_prompts(count: int | None = None) -> list[BenchPrompt]:
    """The first `count` prompts of the set (all when None)."""
    if count is None:
        return list(PROMPTS)
    if count < 1:
        raise UsageError(f"--prompts must be >= 1 (got {count})")
    return list(PROMPTS[:count])
