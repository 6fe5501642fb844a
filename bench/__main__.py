"""``python -m bench``: run every ``bench/bench_*.py`` in turn, each in its own interpreter.

``python -m bench --only envd --runs 50`` runs one bench with its own arguments.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="run the benches")
    parser.add_argument("--only", help="run only bench_<ONLY>.py")
    options, bench_args = parser.parse_known_args()
    benches = sorted(BENCH_DIR.glob("bench_*.py"))
    if options.only:
        benches = [b for b in benches if b.stem == f"bench_{options.only}"]
        if not benches:
            parser.error(f"no bench named bench_{options.only}.py")
    failed = []
    for bench in benches:
        print(f"=== {bench.stem} ===", flush=True)
        extra = bench_args if options.only else []
        if subprocess.run([sys.executable, str(bench), *extra], check=False).returncode != 0:
            failed.append(bench.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
