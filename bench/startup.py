"""How long `splice --help` and `splice list` take to start, each in a fresh process (median of 5).

A benchmark, not a test: the targets (issue 18) are under 0.5 s and under 2 s on an idle machine, so the load
average is printed with the figures. Run: `.venv/bin/python bench/startup.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {"splice --help": ["--help"], "splice list": ["list"]}
TARGETS = {"splice --help": 0.5, "splice list": 2.0}


def seconds(args: list[str]) -> float:
    """Wall time of one fresh `python -m splice.cli ARGS`, its output discarded."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "splice.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    for name, args in COMMANDS.items():
        seconds(args)  # warm the file cache
        times = [seconds(args) for _ in range(runs)]
        print(f"{name:<14} median {statistics.median(times):.2f} s  (min {min(times):.2f}, max {max(times):.2f}, "
              f"{runs} runs; target < {TARGETS[name]:g} s idle)")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
