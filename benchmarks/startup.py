"""How fast the CLI starts: `localmix --help`, `localmix chat --help` and `localmix list` against a
bare `python -c "import typer, rich.console"` (the floor a Typer CLI with rich help pays; localmix's
plain help imports no rich, so its --help may come in under it), in one run.

Each command runs in a fresh process N times, alternating with the others so load on the machine
hits all of them alike; the table shows the best and the median wall time, and each command's
best over the floor's best. `list` runs against an empty LOCALMIX_HOME.

    python benchmarks/startup.py [-n 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "python -c 'import typer, rich.console'": ["-c", "import typer, rich.console"],
    "localmix --help": ["-m", "localmix", "--help"],
    "localmix chat --help": ["-m", "localmix", "chat", "--help"],
    "localmix list": ["-m", "localmix", "list"],
}
TARGET_HELP_S = 0.150


def _time(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LOCALMIX_HOME": home, "COLUMNS": "100"}
        for args in COMMANDS.values():  # warm the file cache and .pyc files first
            _time(args, env)
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for _ in range(rounds):
            for name, args in COMMANDS.items():
                times[name].append(_time(args, env))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    times = measure(rounds)
    floor = min(next(iter(times.values())))
    print(f"{'command':42} {'best ms':>8} {'median ms':>10} {'best / floor':>13}")
    for name, values in times.items():
        best = min(values)
        print(
            f"{name:42} {best * 1000:8.0f} {statistics.median(values) * 1000:10.0f}"
            f" {best / floor:13.2f}"
        )
    help_best = min(times["localmix --help"])
    verdict = "meets" if help_best <= TARGET_HELP_S else "misses"
    print(f"`localmix --help` best {help_best * 1000:.0f} ms {verdict} the 150 ms target")


if __name__ == "__main__":
    main()
