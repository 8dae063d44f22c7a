"""Corpora beyond one file: text records (.jsonl/.gz/.zst/.parquet), worker processes, sharded
token folders read as one stream, training on them (same batches as the single file, exact
resume)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_train import one_thread, tiny_recipe
from typer.testing import CliRunner

from llmcli.checkpoint import read_tensors
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.data.readers import iter_texts
from llmcli.data.shards import ShardedTokens, open_shards, read_index
from llmcli.data.tokenize import open_tokens, read_sidecar, tokenize_files

_threads = pytest.fixture(autouse=True)(one_thread)

runner = CliRunner()
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog;", "rivers", "run",
         "to", "sea.", "Zoë's", "café", "sells", "12", "croissants\n"]


def doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80)))


def corpus_files(folder: Path, records: int = 60) -> list[Path]:
    """One input of every kind: text, Alpaca records, text records plain/gz/zst/parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    folder.mkdir(exist_ok=True)
    lines = lambda: "".join(json.dumps({"id": i, "text": doc(rng)}) + "\n"  # noqa: E731
                            for i in range(records))
    (folder / "a.txt").write_text(doc(rng) * 5, encoding="utf-8")
    (folder / "b.json").write_text(json.dumps([{"instruction": doc(rng), "input": "",
                                                "output": doc(rng)} for _ in range(5)]))
    (folder / "c.jsonl").write_text(lines(), encoding="utf-8")
    with gzip.open(folder / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(lines())
    (folder / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines().encode()))
    pq.write_table(pa.table({"url": ["u"] * records, "text": [doc(rng) for _ in range(records)]}),
                   folder / "f.parquet", row_group_size=16)
    return sorted(folder.iterdir())


def test_a_pool_worker_ends_on_sigterm_whatever_handler_it_inherited():
    """The suite hung in Pool.terminate(): a worker forked from a process whose SIGTERM handler
    an earlier in-process test had set (torchrun_main's) did not end on the pool's SIGTERM.
    The workers' initializer now restores SIGTERM's default action, which needs no Python."""
    import signal

    from llmcli.data import tokenize

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, lambda *_: None)
        tokenize._ignore_interrupts()  # what each worker runs first
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_shards_concatenate_to_the_single_file_whatever_the_workers(tmp_path):
    files = corpus_files(tmp_path / "in")
    single = tokenize_files(files, tmp_path / "single", "cl100k_base", 0.1)
    whole = np.fromfile(tmp_path / "single.tokens", dtype="<u4")
    assert single["documents"] == 1 + 5 + 4 * 60
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        index = tokenize_files(files, out, "cl100k_base", 0.1, shard_tokens=1024,
                                workers=workers)
        folder = tmp_path / f"w{workers}.tokens"
        assert index == read_index(folder)
        assert len(index["shards"]) == -(-len(whole) // 1024)
        assert [s["tokens"] for s in index["shards"][:-1]] == [1024] * (len(index["shards"]) - 1)
        stream = np.concatenate([np.fromfile(folder / s["name"], dtype="<u4")
                                 for s in index["shards"]])
        assert np.array_equal(stream, whole)  # one token stream, cut every 1024 tokens
        for key in ("num_tokens", "val_start", "max_id", "distinct_ids", "documents",
                    "compact_vocab_ids"):
            assert index[key] == single[key], key
        assert [s["sha256"] for s in index["sources"]] == \
            [s["sha256"] for s in single["sources"]]
        open_shards(folder, verify=True)  # every shard's SHA-256 matches the index
    # Workers without shards: the same single file.
    tokenize_files(files, tmp_path / "two", "cl100k_base", 0.1, workers=2)
    assert (tmp_path / "two.tokens").read_bytes() == (tmp_path / "single.tokens").read_bytes()


def test_text_records_stream_and_bad_records_are_one_line_errors(tmp_path):
    files = {p.name: p for p in corpus_files(tmp_path / "in", records=5)}
    for name in ("c.jsonl", "d.jsonl.gz", "e.jsonl.zst", "f.parquet"):
        assert len(list(iter_texts(files[name]))) == 5
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"body": "b"}\n'))
    with pytest.raises(UserError, match="line 2: no field 'text'.*--text-field"):
        list(iter_texts(tmp_path / "bad.jsonl.gz"))
    with pytest.raises(UserError, match="no column 'content'"):
        list(iter_texts(files["f.parquet"], "content"))
    # --text-field picks another field.
    (tmp_path / "g.jsonl").write_text('{"content": "hello there"}\n', encoding="utf-8")
    meta = tokenize_files([tmp_path / "g.jsonl"], tmp_path / "g", "bytes", 0.0,
                          text_field="content")
    assert meta["num_tokens"] == len("hello there")


def test_a_sharded_corpus_reads_as_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype("<u4") for n in (7, 1, 13, 5)]
    whole = np.concatenate(parts)
    sharded = ShardedTokens(parts)
    assert len(sharded) == len(whole)
    index = rng.integers(0, len(whole), (6, 9))
    assert np.array_equal(sharded[index], whole[index])
    for lo, hi in ((0, 26), (3, 9), (7, 8), (6, 22), (25, 26), (10, 10)):
        assert np.array_equal(sharded[lo:hi], whole[lo:hi])
    assert sharded[21] == whole[21] and sharded[-1] == whole[-1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = corpus_files(tmp_path / "in", records=40)
    tokenize_files(files, tmp_path / "data" / "file", "bytes", 0.1)
    tokenize_files(files, tmp_path / "data" / "shards", "bytes", 0.1, shard_tokens=4096,
                    workers=2)
    return tmp_path


def pretrain_on(source: str, run: str, max_iters: int, resume: bool = False):
    from llmcli.pretrain import pretrain
    from llmcli.recipe import build_recipe

    raw = tiny_recipe(max_iters=max_iters, checkpoint_interval=2, eval_interval=2)
    raw["data"]["source"] = source
    raw["model"]["vocab_size"] = "auto"
    return pretrain(build_recipe(raw), run_dir=Path(run), resume=resume or None)


def test_training_on_shards_is_training_on_the_file_and_resumes_exactly(project):
    index = read_index(project / "data" / "shards.tokens")
    assert len(index["shards"]) > 3
    assert read_sidecar(project / "data" / "shards.tokens")["val_start"] == index["val_start"]
    assert len(open_tokens(project / "data" / "shards.tokens")) == index["num_tokens"]
    file = pretrain_on("data/file.tokens", "file", 6)
    shards = pretrain_on("data/shards.tokens", "shards", 6)
    assert shards.losses == file.losses and shards.evals == file.evals
    a, b = (read_tensors(project / run / "step-00000006.safetensors") for run in ("file", "shards"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    pretrain_on("data/shards.tokens", "resumed", 4)
    resumed = pretrain_on("data/shards.tokens", "resumed", 6, resume=True)
    assert {s: resumed.losses[s] for s in (5, 6)} == {s: shards.losses[s] for s in (5, 6)}
    c = read_tensors(project / "resumed" / "step-00000006.safetensors")
    assert all(np.array_equal(b[k].numpy(), c[k].numpy()) for k in b)


def test_damaged_shard_folders_are_one_line_errors(project):
    folder = project / "data" / "shards.tokens"
    shard = folder / read_index(folder)["shards"][1]["name"]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(UserError, match="holds .* tokens but index.json says"):
        open_shards(folder)
    shard.unlink()
    with pytest.raises(UserError, match="missing shard"):
        open_shards(folder)
    (folder / "index.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="not a shard index"):
        read_index(folder)


def test_tokenize_command_writes_shards_with_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus_files(tmp_path / "in", records=30)
    (tmp_path / "in" / "a.txt").unlink()  # a folder with .txt files is read for those
    result = runner.invoke(app, ["tokenize", "in", "--shard-tokens", "2048", "--workers", "2",
                                 "-o", "data/web", "--tokenizer", "bytes"])
    assert result.exit_code == 0, result.output
    assert "wrote data/web.tokens/ (" in result.output and "shards of up to 2,048" in result.output
    index = read_index(tmp_path / "data" / "web.tokens")
    # A folder of text-record files gives those (the Alpaca .json beside them is left out:
    # the folder is read as the web corpus it holds).
    assert [Path(s["path"]).name for s in index["sources"]] == \
        ["c.jsonl", "d.jsonl.gz", "e.jsonl.zst", "f.parquet"]
    result = runner.invoke(app, ["tokenize", "in", "--shard-tokens", "10"])
    assert result.exit_code == 2 and "--shard-tokens 10" in result.output
    recipe = tiny_recipe(max_iters=2, checkpoint_interval=2, eval_interval=2)
    recipe["model"]["vocab_size"] = "auto"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = runner.invoke(app, ["pretrain", "r.yaml", "data.source=data/web.tokens"])
    assert result.exit_code == 0, result.output
    assert "step 2, train loss" in result.output


# ---------------------------------------------------------------------------------------------
# llm fetch hf://datasets/OWNER/NAME/DIR/*.jsonl.gz: many files, each resumed and verified


def hf_dataset(server, files: dict[str, bytes], sha_override: dict[str, str] | None = None):
    import hashlib

    listing = []
    for path, data in files.items():
        server.files[f"/datasets/o/web/resolve/main/{path}"] = data
        digest = (sha_override or {}).get(path, hashlib.sha256(data).hexdigest())
        listing.append({"type": "file", "path": path, "size": len(data), "oid": "0" * 40,
                        "lfs": {"oid": digest, "size": len(data), "pointerSize": 130}})
    listing.append({"type": "directory", "path": "data/sub", "oid": "1" * 40, "size": 0})
    server.files["/api/datasets/o/web/tree/main/data?recursive=true"] = json.dumps(listing).encode()


def test_fetch_a_glob_of_hf_shards_resumes_verifies_and_tokenizes(tmp_path, monkeypatch):
    from test_fetch import Server

    from llmcli.data.fetch import fetch

    server = Server()
    server.thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        rng = random.Random(1)
        shards = {f"data/part-{i}.jsonl.gz": gzip.compress("".join(
            json.dumps({"text": doc(rng)}) + "\n" for _ in range(40)).encode()) for i in range(3)}
        hf_dataset(server, {**shards, "data/README.md": b"# notes\n"})
        server.drop_after["/datasets/o/web/resolve/main/data/part-1.jsonl.gz"] = 100
        folder = fetch("hf://datasets/o/web/data/*.jsonl.gz", tmp_path / "dl", backoff=0)
        assert folder == tmp_path / "dl" / "web" / "data"
        names = sorted(Path(p).name for p in shards)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            names + [f".{name}.fetched.json" for name in names])  # the data, and hidden records
        for path, data in shards.items():
            assert (tmp_path / "dl" / "web" / path).read_bytes() == data
        resumed = [h for p, h in server.requests if p.endswith("part-1.jsonl.gz")]
        assert len(resumed) == 2 and resumed[1].get("Range") == "bytes=100-"
        # Again: nothing is downloaded twice (complete files are checked, not fetched).
        before = len(server.requests)
        assert fetch("hf://datasets/o/web/data/*.jsonl.gz", tmp_path / "dl", backoff=0) == folder
        assert all("/resolve/" not in p for p, _ in server.requests[before:])
        # The folder form takes every file under it.
        whole = fetch("hf://datasets/o/web/data/", tmp_path / "all", backoff=0)
        assert (whole / "README.md").read_bytes() == b"# notes\n"
        # A file whose bytes differ from the Hub's SHA-256 is kept aside, never installed.
        hf_dataset(server, shards, {"data/part-2.jsonl.gz": "f" * 64})
        with pytest.raises(UserError, match="SHA-256 mismatch"):
            fetch("hf://datasets/o/web/data/*.gz", tmp_path / "bad", backoff=0)
        assert (tmp_path / "bad" / "web" / "data" / "part-2.jsonl.gz.bad").exists()
        assert not (tmp_path / "bad" / "web" / "data" / "part-2.jsonl.gz").exists()
        with pytest.raises(UserError, match="no files match"):
            fetch("hf://datasets/o/web/data/*.parquet", tmp_path / "none", backoff=0)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    # The downloaded folder is a corpus as it stands.
    index = tokenize_files([folder], tmp_path / "web", "bytes", 0.1, shard_tokens=2048,
                            workers=2)
    assert index["documents"] == 120 and len(index["sources"]) == 3


def test_params_scaling_and_inspect_read_a_shard_folder_like_its_single_file(project):
    """`llm params` / `llm scaling` count an auto vocabulary from the folder's index, as from the
    single file's sidecar, and `inspect embeddings` counts token frequencies across its shards."""
    from llmcli.data.shards import open_shards
    from llmcli.inspect.embeddings import corpus_token_file
    from llmcli.recipe import build_recipe
    from llmcli.scaling import find_sidecar, recipe_vocab

    counted = {}
    for name in ("file", "shards"):
        raw = tiny_recipe()
        raw["data"].update(source=f"data/{name}.tokens", tokenizer="bytes", vocab="compact")
        raw["model"]["vocab_size"] = "auto"
        recipe = build_recipe(raw)
        found = find_sidecar(recipe.data.source, "bytes")
        assert found is not None, name
        counted[name], note = recipe_vocab(recipe, found)
        assert "not tokenized" not in note and str(found[0]) in note
        assert corpus_token_file(recipe) == Path(f"data/{name}.tokens")
    assert counted["file"] == counted["shards"] > 1
    assert find_sidecar("data/shards.tokens", "bytes")[0] == Path("data/shards.tokens/index.json")
    single = np.memmap(project / "data" / "file.tokens", dtype="<u4", mode="r")
    assert np.array_equal(np.asarray(open_shards(Path("data/shards.tokens")).head(5000)),
                          single[:5000])
