"""How long the ``approxtrain`` commands that train nothing take: ``--help``, ``--cfg job`` and
one shell-completion query (what a TAB runs), against the import of Hydra and rich alone.

Each command runs ``--repeat`` times in a fresh process (wall clock, output discarded);
the median is reported with the ratio to ``python -c "import hydra, rich"``.

    python scripts/cli_startup.py                 # 7 runs each
    python scripts/cli_startup.py --repeat 11 --json outputs/cli_startup.json
    PYTHONPATH=/path/to/other/checkout python scripts/cli_startup.py --module   # another version's CLI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

BASELINE = "import hydra, rich"


def commands(app: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv, extra environment) of each timed command."""
    completion = {"COMP_LINE": "approxtrain sampler=", "COMP_POINT": "20"}
    return {
        f'python -c "{BASELINE}"': ([sys.executable, "-c", BASELINE], {}),
        f'python -c "{BASELINE}, torch"': ([sys.executable, "-c", f"{BASELINE}, torch"], {}),
        "approxtrain --help": ([*app, "--help"], {}),
        "approxtrain --cfg job": ([*app, "--cfg", "job"], {}),
        "approxtrain -sc query=bash (COMP_LINE='approxtrain sampler=')": ([*app, "-sc", "query=bash"], completion),
    }


def seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (the median is reported)")
    parser.add_argument("--json", help="also write the medians (seconds) to this file")
    parser.add_argument("--module", action="store_true",
                        help="run python -m approxtrain.cli.train (the approxtrain on sys.path) instead of the installed script")
    args = parser.parse_args()
    installed = None if args.module else shutil.which("approxtrain")
    app = [installed] if installed else [sys.executable, "-m", "approxtrain.cli.train"]
    rows = {name: [] for name in commands(app)}
    for _ in range(args.repeat):  # round by round, so a burst of load hits every command alike
        for name, (argv, env) in commands(app).items():
            rows[name].append(seconds(argv, env))
    medians = {name: statistics.median(times) for name, times in rows.items()}
    base = medians[f'python -c "{BASELINE}"']
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"median of {args.repeat} runs")
    for name, median in medians.items():
        print(f"{median:7.2f} s  {median / base:5.2f}x  {name}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"repeat": args.repeat, "median_s": medians}, handle, indent=2)


if __name__ == "__main__":
    main()
