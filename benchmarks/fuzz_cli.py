"""Fuzz every `llm` command's arguments: 10,000+ cases, each with a 30 s limit.

The generators are those of tests/test_fuzz.py (hypothesis draws the cases up front); each case
runs in-process with typer's CliRunner inside a forked worker, which is killed and replaced when
a case passes the time limit. At the end: cases run, tracebacks (first distinct signatures),
hangs, files left behind, exit codes, cases/s. Exits 1 if any traceback, hang or leftover.

    python benchmarks/fuzz_cli.py [--cases 10000] [--seed 0] [--workers 2] [--timeout 30]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_fuzz as fz  # noqa: E402  (the generators and the judge live with the tests)


def draw_cases(n: int, seed: int) -> list[fz.Case]:
    """n cases from the same hypothesis strategies as the test slice, reproducible by seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    cases: list[fz.Case] = []

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=fz.CASES)
    def collect(case: fz.Case) -> None:
        cases.append(case)

    collect()
    return cases


def worker(conn: Connection, cases_dir: Path) -> None:
    """Run cases sent over conn; send back (index, outcome) for each."""
    import torch

    torch.set_num_threads(1)
    while True:
        job = conn.recv()
        if job is None:
            return
        index, case = job
        case_dir = cases_dir / str(index)
        try:
            outcome = fz.run_case(case, case_dir)
        except Exception as exc:  # the harness itself failed: report it as this case's problem
            outcome = fz.Outcome(case.argv, None, "", "", f"harness: {exc!r}", 0.0, [])
        if not fz.problems(outcome, case):
            shutil.rmtree(case_dir, ignore_errors=True)
        conn.send((index, outcome))


class Pool:
    """Forked workers, one case each at a time; a worker past the timeout is killed and replaced."""

    def __init__(self, size: int, cases_dir: Path) -> None:
        self.cases_dir = cases_dir
        self.ctx = mp.get_context("fork")
        self.workers: list[tuple[Any, Connection]] = [self._spawn() for _ in range(size)]

    def _spawn(self) -> tuple[Any, Connection]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, self.cases_dir), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, cases: list[fz.Case], timeout: float, report: Any) -> None:
        pending = collections.deque(enumerate(cases))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (case index, started)
        while pending or busy:
            for slot in range(len(self.workers)):
                if slot not in busy and pending:
                    index, case = pending.popleft()
                    self.workers[slot][1].send((index, case))
                    busy[slot] = (index, time.monotonic())
            conns = {self.workers[s][1]: s for s in busy}
            ready = wait(list(conns), timeout=1.0)
            for conn in ready:
                slot = conns[conn]
                try:
                    index, outcome = conn.recv()
                except EOFError:  # the worker died (killed by the OS, a segfault)
                    index = busy[slot][0]
                    report.crash(cases[index])
                    self._replace(slot)
                else:
                    report.add(outcome, cases[index])
                del busy[slot]
            now = time.monotonic()
            for slot, (index, started) in list(busy.items()):
                if now - started > timeout:
                    report.hang(cases[index], now - started)
                    self._replace(slot)
                    del busy[slot]

    def _replace(self, slot: int) -> None:
        proc, conn = self.workers[slot]
        proc.kill()
        proc.join()
        conn.close()
        self.workers[slot] = self._spawn()

    def close(self) -> None:
        for proc, conn in self.workers:
            conn.send(None)
            proc.join(5)
            if proc.is_alive():
                proc.kill()


class Report:
    def __init__(self) -> None:
        self.count = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.commands: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, list[Any]] = collections.defaultdict(list)
        self.leftovers: list[str] = []
        self.hangs: list[tuple[list[str], float]] = []
        self.usage_errors = 0
        self.exit1: collections.Counter[str] = collections.Counter()
        self.slowest: list[tuple[float, list[str]]] = []

    def add(self, o: fz.Outcome, case: fz.Case) -> None:
        self.count += 1
        self.codes[str(o.exit_code)] += 1
        self.commands[_command(o.argv)] += 1
        self.usage_errors += fz.is_usage_error(o)
        if o.exit_code == 1 and o.stderr.strip():
            words = o.stderr.strip().splitlines()[-1].split()
            self.exit1[f"{_command(o.argv)}: {' '.join(words[:8])[:100]}"] += 1
        self.slowest = sorted([*self.slowest, (o.seconds, o.argv)], reverse=True)[:5]
        for problem in fz.problems(o, case):
            if problem.startswith("left behind"):
                self.leftovers.append(f"{_short(o.argv)}: {problem}")
            else:
                self.failures[f"{_command(o.argv)}: {problem[:160]}"].append(o.argv)

    def hang(self, case: fz.Case, seconds: float) -> None:
        self.count += 1
        self.codes["hang"] += 1
        self.hangs.append((case.argv, seconds))

    def crash(self, case: fz.Case) -> None:
        self.count += 1
        self.codes["crash"] += 1
        self.failures["worker died (segfault or killed)"].append(case.argv)

    def print(self, seconds: float, outside: list[str]) -> int:
        tracebacks = sum(len(v) for v in self.failures.values())
        print(f"cases run        {self.count:,} in {seconds:.0f} s ({self.count / seconds:.1f} "
              "cases/s)")
        print("by command       " + ", ".join(f"{k} {v}" for k, v in sorted(self.commands.items())))
        print("exit codes       " + ", ".join(f"{k}: {v}" for k, v in sorted(self.codes.items())))
        print(f"usage errors     {self.usage_errors:,} (click's own parse errors, exit 2)")
        print(f"exit 1 (the job failed, not the input: network, model files, ...), "
              f"{len(self.exit1)} distinct:")
        for line, n in self.exit1.most_common(6):
            print(f"  {n} x {line}")
        print(f"tracebacks       {tracebacks} ({len(self.failures)} distinct)")
        for signature, argvs in list(self.failures.items())[:8]:
            print(f"  {len(argvs)} x {signature}\n      e.g. llm {_short(argvs[0])}")
        print(f"hangs (> limit)  {len(self.hangs)}")
        for argv, secs in self.hangs[:5]:
            print(f"  {secs:.0f} s: llm {_short(argv)}")
        print(f"left behind      {len(self.leftovers) + len(outside)}")
        for line in (self.leftovers + outside)[:5]:
            print(f"  {line}")
        print("slowest          " + "; ".join(f"{s:.1f} s llm {_short(a, 60)}"
                                               for s, a in self.slowest[:3]))
        return 1 if tracebacks or self.hangs or self.leftovers or outside else 0


def _command(argv: list[str]) -> str:
    return next((a for a in argv if a in fz.COMMANDS), "?")


def _short(argv: list[str], width: int = 200) -> str:
    text = " ".join(repr(a) if not a or any(c in a for c in " \n'\"") else a for a in argv)
    return text if len(text) <= width else text[:width] + "..."


def snapshot(dirs: list[Path]) -> set[str]:
    """Names directly under dirs: what a case may have written outside its own directory."""
    names: set[str] = set()
    for d in dirs:
        if d.is_dir():
            names |= {str(p) for p in d.iterdir()}
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: fail fast, do not look it up
    watched = [ROOT / "data", ROOT / "checkpoints", Path.home()]
    before = snapshot(watched)
    work = Path(tempfile.mkdtemp(prefix="llm-fuzz-"))
    fz.build_workspace(work)
    started = time.perf_counter()
    cases = draw_cases(args.cases, args.seed)
    print(f"drew {len(cases):,} cases in {time.perf_counter() - started:.0f} s", flush=True)
    # Heavy imports once, before forking, so replacement workers start in milliseconds.
    import llmcli.data.tokenizer as tokenizer_module
    import llmcli.generate.pipeline  # noqa: F401

    tokenizer_module.get_tokenizer("cl100k_base")
    with __import__("contextlib").suppress(ImportError):
        import diffusers  # noqa: F401

    report = Report()
    pool = Pool(args.workers, work / "cases")
    t0 = time.perf_counter()
    try:
        pool.run(cases, args.timeout, report)
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    outside = sorted(snapshot(watched) - before - {str(work)}) + fz.leftovers(work / "fix")
    code = report.print(seconds, outside)
    if code == 0:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"cases with problems kept in {work / 'cases'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
