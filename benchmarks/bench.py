"""The benchmark harness as a script: the same options as `zimage-lite bench`.

    python benchmarks/bench.py --synthetic tiny --out bench-out            # CPU, a minute
    python benchmarks/bench.py --model /path/Z-Image-Turbo --vram 6GB      # every precision, GPU

See docs/bench-report-schema.md for what report.json holds.
"""

from __future__ import annotations

import argparse
import logging
import sys

from zimage_lite.bench.runner import add_bench_arguments, run_bench_from_args
from zimage_lite.errors import ZImageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="zimage-lite: every precision against the BF16 reference")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return run_bench_from_args(args)
    except ZImageError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
