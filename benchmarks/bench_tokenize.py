"""Tokenizer throughput and memory: `llm tokenize`'s streaming path vs tiktoken on its own.

Builds a ~100 MB text file (the shared corpora repeated: the sales textbook, Tiny Shakespeare
and the English and Chinese Alpaca records' text) and measures, each in a fresh subprocess so
peak RSS means something:

  baseline  tiktoken's `encode_ordinary_batch` with one thread per core on the whole text
            (read into memory and split into ~1 MB pieces beforehand; only the call is timed)
  stream    `tokenize_files` on the file: read, hash, decode, encode, write token file and
            sidecar, all timed

Rounds alternate the two and keep each one's best time (the machine may be shared). Prints
MB/s, the ratio stream/baseline (target >= 0.90) and peak RSS, plus the streaming RSS on a
quarter-size file to show memory does not grow with the corpus.

    python benchmarks/bench_tokenize.py [--mb 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PIECE = 1 << 20


def corpus_text() -> tuple[str, str]:
    """One copy of the mixed corpus, and where it came from."""
    sys.path.insert(0, str(ROOT))
    from llmcli.data.records import read_records, record_text

    if not SHARED.is_dir():
        from llmcli.data.corpus import builtin_text

        return builtin_text(), "built-in corpus (shared data not found)"
    parts = [(SHARED / name).read_text(encoding="utf-8")
             for name in ("sales_textbook.txt", "tinyshakespeare.txt")]
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        parts.append("\n\n".join(record_text(r) for r in read_records(SHARED / name)))
    return "\n\n".join(parts) + "\n", "sales_textbook + tinyshakespeare + alpaca en/zh text"


def build_file(path: Path, megabytes: float) -> int:
    text, _ = corpus_text()
    data = text.encode("utf-8")
    target = int(megabytes * 1e6)
    with open(path, "wb") as fh:
        written = 0
        while written < target:
            chunk = data[: target - written]
            cut = chunk.rfind(b"\n") + 1 if len(chunk) < len(data) else len(chunk)
            fh.write(chunk[:cut] if cut else chunk)
            written += cut if cut else len(chunk)
    return written


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024 / 1024


def worker(kind: str, path: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from llmcli.data.tokenizer import cpu_threads, get_tokenizer

    tok = get_tokenizer("cl100k_base")
    threads = cpu_threads()
    if kind == "baseline":
        from llmcli.data.tokenize import find_cut

        data = path.read_bytes()
        pieces, start = [], 0
        while start < len(data):  # ~1 MB pieces at cuts that keep tokens identical
            cut = find_cut(data[: start + PIECE], start) if start + PIECE < len(data) else -1
            end = cut if cut > 0 else len(data)
            pieces.append(data[start:end].decode("utf-8"))
            start = end
        del data
        began = time.perf_counter()
        ids = tok.encoding.encode_ordinary_batch(pieces, num_threads=threads)
        seconds = time.perf_counter() - began
        tokens = sum(len(x) for x in ids)
    else:
        from llmcli.data.tokenize import tokenize_files

        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            meta = tokenize_files([path], Path(tmp) / "bench.tokens")
            seconds = time.perf_counter() - began
        tokens = meta["num_tokens"]
    return {"seconds": seconds, "tokens": tokens, "rss_mb": peak_rss_mb(), "threads": threads}


def run_worker(kind: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", kind, str(path)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "corpus.txt", Path(tmp) / "quarter.txt"
        size = build_file(big, args.mb)
        small_size = build_file(small, args.mb / 4)
        print(f"corpus: {size / 1e6:.1f} MB of {corpus_text()[1]}, repeated")
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for kind in ("baseline", "stream"):
                result = run_worker(kind, big)
                if kind not in best or result["seconds"] < best[kind]["seconds"]:
                    best[kind] = result
        quarter = run_worker("stream", small)

    base, stream = best["baseline"], best["stream"]
    rate = {k: size / 1e6 / v["seconds"] for k, v in best.items()}
    print(f"threads: {base['threads']} (one per core)")
    print(f"baseline  tiktoken encode_ordinary_batch: {rate['baseline']:6.1f} MB/s  "
          f"peak RSS {base['rss_mb']:7.0f} MB  ({base['tokens']:,} tokens)")
    print(f"stream    llm tokenize (read+hash+write): {rate['stream']:6.1f} MB/s  "
          f"peak RSS {stream['rss_mb']:7.0f} MB  ({stream['tokens']:,} tokens)")
    print(f"ratio stream/baseline: {rate['stream'] / rate['baseline']:.2f}  (target >= 0.90)")
    print(f"stream peak RSS: {quarter['rss_mb']:.0f} MB at {small_size / 1e6:.0f} MB, "
          f"{stream['rss_mb']:.0f} MB at {size / 1e6:.0f} MB "
          f"(ratio {stream['rss_mb'] / quarter['rss_mb']:.2f} for 4x the text)")
    print(f"same tokens: {'yes' if base['tokens'] == stream['tokens'] else 'NO'}")


if __name__ == "__main__":
    main()
