"""Start-up time of `llm --help` and `llm scaling --params 140M`, against `python -c pass`.

Each command runs as a fresh subprocess; the best of several runs is the figure (the least
disturbed by other work on the machine), the median is shown beside it. The interpreter's own
start-up is measured in the same run, so the ratios hold across machines. Target: < 0.5 s each.

    python benchmarks/bench_startup.py [--runs 9] [--importtime]

`--importtime` adds where the time goes: the slowest top-level imports of each command
(python -X importtime), which is how to tell our code from typer/rich/yaml.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.5


def llm_command() -> tuple[list[str], str]:
    """The `llm` console script installed beside this interpreter, else `python -m llmcli`."""
    script = Path(sys.executable).parent / "llm"
    if script.exists():
        return [str(script)], str(script)
    return [sys.executable, "-m", "llmcli"], "python -m llmcli"


def timed(argv: list[str], runs: int) -> list[float]:
    env = {**os.environ, "NO_COLOR": "1"}
    subprocess.run(argv, capture_output=True, env=env, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - start)
    return times


def top_imports(argv: list[str], count: int = 12) -> list[tuple[float, float, str]]:
    """(cumulative s, self s, module) for the slowest imports made directly by the program."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                            text=True, env={**os.environ, "NO_COLOR": "1"})
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if match and len(match.group(3)) <= 2:  # top level, or imported by a top-level module
            own, cumulative, indent, name = match.groups()
            rows.append((int(cumulative) / 1e6, int(own) / 1e6, indent + name))
    return sorted(rows, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()

    llm, llm_label = llm_command()
    cases = [
        ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
        (f"{llm_label} --help", [*llm, "--help"]),
        (f"{llm_label} scaling --params 140M", [*llm, "scaling", "--params", "140M"]),
        ("python -m llmcli --help", [sys.executable, "-m", "llmcli", "--help"]),
    ]
    on_path = shutil.which("llm")
    if on_path and Path(on_path).resolve() != Path(llm[0]).resolve():
        # e.g. a pyenv shim: a shell script that finds the interpreter before starting it
        cases.append((f"llm --help via PATH ({on_path})", [on_path, "--help"]))

    print(f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs, "
          f"best and median of {args.runs} runs")
    print(f"{'command':<60} {'best s':>7} {'median s':>9} {'× python':>9} {'target':>7}")
    baseline = None
    for label, argv in cases:
        times = timed(argv, args.runs)
        best, median = min(times), statistics.median(times)
        baseline = baseline or best
        verdict = "" if baseline == best and label.endswith("(baseline)") else \
            ("ok" if best < TARGET_S else "SLOW")
        print(f"{label:<60} {best:7.3f} {median:9.3f} {best / baseline:9.2f} {verdict:>7}")

    if args.importtime:
        for title, argv in (("llm --help", ["-m", "llmcli", "--help"]),
                            ("llm scaling --params 140M",
                             ["-m", "llmcli", "scaling", "--params", "140M"])):
            print(f"\nslowest imports of {title} (cumulative s, self s):")
            for cumulative, own, name in top_imports(argv):
                print(f"  {cumulative:6.3f} {own:6.3f}  {name}")


if __name__ == "__main__":
    main()
