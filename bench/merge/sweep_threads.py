"""Sweep `mot-train merge --threads` and the parallel slice size in one process (torch imported once).

    .venv/bin/python bench/merge/sweep_threads.py --workdir /tmp/mot-bench-merge --threads 1,2,3,4,6,8 \
        --slices 256Ki,1Mi --repeat 2

Uses the inputs bench_merge.py left with --keep (workdir/input-*). Prints the merge's wall time per
setting (best of --repeat), process start and `import torch` excluded: compare with bench_merge's raw.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from mot_trainer import cli
from mot_trainer.merge import merger

UNITS = {"Ki": 1 << 10, "Mi": 1 << 20}


def elements(text: str) -> int:
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/mot-bench-merge")
    parser.add_argument("--threads", default="1,2,3,4,6,8")
    parser.add_argument("--slices", default="256Ki,1Mi", help="PARALLEL_SLICE_ELEMENTS values to try")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    inputs = sorted(str(p) for p in work.glob("input-*"))
    if not inputs:
        raise SystemExit(f"no inputs in {work}: run bench_merge.py --keep first")
    out = work / "out-sweep"
    logging.disable(logging.INFO)
    results: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.repeat):
        for slice_text in args.slices.split(","):
            for threads in map(int, args.threads.split(",")):
                merger.PARALLEL_SLICE_ELEMENTS = elements(slice_text)
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                code = cli.main(["merge", "--threads", str(threads), "--inputs", *inputs, "--out", str(out)])
                if code != 0:
                    raise SystemExit(f"merge failed with exit code {code}")
                seconds = time.perf_counter() - start
                results.setdefault((elements(slice_text), threads), []).append(seconds)
                print(f"slice {slice_text} threads {threads}: {seconds:.2f}s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    for (slice_elements, threads), runs in sorted(results.items()):
        print(f"slice {slice_elements >> 10}Ki threads {threads}: best {min(runs):.2f}s "
              f"runs {[round(r, 2) for r in runs]}")


if __name__ == "__main__":
    main()
