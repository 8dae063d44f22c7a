"""Web-scale tokenizing: a multi-file .jsonl.gz corpus with --workers 2 vs 1, and memory.

Builds FILES gzip'd jsonl files (FineWeb's layout: one {"text": ...} record per line) from the
shared corpora (sales textbook, Tiny Shakespeare, Alpaca en/zh text cut into paragraph-sized
documents), then runs `tokenize_files` into a sharded folder (--shard-tokens) in a fresh
subprocess per measurement, so peak RSS means something:

  workers 1 vs 2   seconds (best of --rounds, alternating), the ratio t(1) / t(2) and MB/s of
                   uncompressed text; both outputs must be byte-identical. One worker already
                   encodes on one thread per core (tiktoken runs without the GIL); what workers
                   add is the GIL-bound part (gunzip, json, the Python loop) on every core, so
                   the row "1 worker, 1 thread" shows what two processes do over one core
  memory           peak RSS of the main process and of the largest worker for the input as
                   built and for an input 4x larger (same number of files, each 4x longer):
                   flat means the 4x run's peaks stay within a few MB of the 1x run's

    python benchmarks/bench_tokenize_shards.py [--mb 8] [--files 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def documents() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from llmcli.data.records import read_records, record_text

    if not SHARED.is_dir():
        from llmcli.data.corpus import builtin_text

        texts = [builtin_text()]
    else:
        texts = [(SHARED / n).read_text(encoding="utf-8")
                 for n in ("sales_textbook.txt", "tinyshakespeare.txt")]
        for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
            texts.extend(record_text(r) for r in read_records(SHARED / name))
    docs = []
    for text in texts:
        docs.extend(p.strip() for p in text.split("\n\n") if p.strip())
    return docs


def build(folder: Path, files: int, megabytes: float) -> int:
    """`files` .jsonl.gz files holding `megabytes` of text in all; returns the text bytes."""
    docs = documents()
    folder.mkdir(parents=True, exist_ok=True)
    per_file = megabytes * 1e6 / files
    total, i = 0, 0
    for f in range(files):
        size = 0
        with gzip.open(folder / f"part-{f:05d}.jsonl.gz", "wt", encoding="utf-8",
                       compresslevel=6) as fh:
            while size < per_file:
                text = docs[i % len(docs)]
                i += 1
                fh.write(json.dumps({"text": text, "id": i}, ensure_ascii=False) + "\n")
                size += len(text.encode("utf-8"))
        total += size
    return total


def peak_mb(who: int) -> float:
    peak = resource.getrusage(who).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024 / 1024


def worker(folder: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    threads = None
    if workers == 0:  # one worker, one thread
        workers, threads = 1, 1
    sys.path.insert(0, str(ROOT))
    from llmcli.data.tokenize import tokenize_files

    inputs = sorted(folder.glob("*.jsonl.gz"))
    start = time.perf_counter()
    index = tokenize_files(inputs, out, "cl100k_base", 0.01, shard_tokens=shard_tokens,
                            workers=workers, threads=threads)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for shard in index["shards"]:
        digest.update((out.with_name(out.name + ".tokens") / shard["name"]).read_bytes())
    return {"seconds": seconds, "tokens": index["num_tokens"], "shards": len(index["shards"]),
            "digest": digest.hexdigest(), "peak_main_mb": peak_mb(resource.RUSAGE_SELF),
            "peak_worker_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def measure(folder: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", str(folder), str(out),
                           str(workers), str(shard_tokens)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0, help="text in the 1x input")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-tokens", type=int, default=1 << 20)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, out, workers, shard_tokens = args.worker
        print(json.dumps(worker(Path(folder), Path(out), int(workers), int(shard_tokens))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp_path = Path(tmp)
        small = build(tmp_path / "x1", args.files, args.mb)
        best: dict[int, dict] = {}
        for _ in range(args.rounds):
            for workers in (1, 2, 0):
                result = measure(tmp_path / "x1", tmp_path / f"out{workers}", workers,
                                 args.shard_tokens)
                if workers not in best or result["seconds"] < best[workers]["seconds"]:
                    best[workers] = result
        one, two = best[1], best[2]
        assert one["digest"] == two["digest"], "workers changed the output"
        print(f"input: {args.files} .jsonl.gz files, {small / 1e6:.1f} MB of text, "
              f"{one['tokens']:,} tokens -> {one['shards']} shards")
        for workers, r in best.items():
            label = f"--workers {workers}" if workers else "1 worker, 1 thread"
            print(f"  {label}: {r['seconds']:.2f} s, {small / 1e6 / r['seconds']:.1f} "
                  f"MB/s, peak RSS main {r['peak_main_mb']:.0f} MB, largest worker "
                  f"{r['peak_worker_mb']:.0f} MB")
        print(f"  ratio t(1 worker) / t(2 workers) = {one['seconds'] / two['seconds']:.2f} "
              "(outputs byte-identical); t(1 worker, 1 thread) / t(2 workers) = "
              f"{best[0]['seconds'] / two['seconds']:.2f}")
        big = build(tmp_path / "x4", args.files, 4 * args.mb)
        four = measure(tmp_path / "x4", tmp_path / "out4", 2, args.shard_tokens)
        print(f"memory, --workers 2: input {small / 1e6:.1f} MB -> peak main "
              f"{two['peak_main_mb']:.0f} MB, worker {two['peak_worker_mb']:.0f} MB; input "
              f"{big / 1e6:.1f} MB (4x) -> main {four['peak_main_mb']:.0f} MB, worker "
              f"{four['peak_worker_mb']:.0f} MB ({four['seconds']:.2f} s, "
              f"{four['tokens']:,} tokens)")
        grow = max(four["peak_main_mb"] - two["peak_main_mb"],
                   four["peak_worker_mb"] - two["peak_worker_mb"])
        print(f"peak memory grew {grow:+.0f} MB for 4x the input: "
              f"{'flat' if grow < 32 else 'NOT flat'}")


if __name__ == "__main__":
    main()
