"""`llm pretrain` end to end: recipe + overrides -> corpus -> training -> run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from helpers_train import make_project, markov_tokens, one_thread, write_tokens
from typer.testing import CliRunner

from llmcli.checkpoint import read_metadata, step_checkpoints
from llmcli.cli import app
from llmcli.data.tokenizer import get_tokenizer
from llmcli.data.vocab import reserved_ids

_threads = pytest.fixture(autouse=True)(one_thread)

runner = CliRunner()



@pytest.fixture
def project(tmp_path, monkeypatch):
    return make_project(tmp_path, monkeypatch)


def llm(*args: str):
    return runner.invoke(app, list(args))


def test_the_largest_documented_seed_trains(project):
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=2",
                 f"train.seed={2**63 - 1}")
    assert result.exit_code == 0, result.output


def test_a_model_that_overflows_from_the_start_is_one_line_and_leaves_no_run(project):
    """fp16 with model.init_std=10: "Step: 0 Training Loss: nan" was printed as a normal line,
    a step was taken, and the error blamed the learning rate and clipping."""
    bad = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.precision=fp16",
              "model.init_std=10", "model.activation=swiglu")
    assert bad.exit_code == 1, bad.output
    assert "Step: 0" not in bad.stderr and "Traceback" not in bad.output
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss of the model before any training is nan")
    assert "model.init_std=10" in last and "train.precision=fp16" in last
    again = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=3")
    assert again.exit_code == 0, again.output
    assert "warning" not in again.stderr


def test_trains_into_the_default_run_directory(project):
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens")
    assert result.exit_code == 0, result.output
    run = project / "checkpoints" / "mini"
    assert [s for s, _ in step_checkpoints(run)] == [3, 6]
    assert (run / "metrics.jsonl").exists() and (run / "loss.png").exists()
    assert "step 6" in result.stdout and "val loss" in result.stdout
    assert "Step: 0 Training Loss:" in result.stderr
    meta = read_metadata(run / "step-00000006.safetensors")
    assert meta["recipe"]["model"]["vocab_size"] == 48  # auto: largest id + 1
    assert meta["tokenizer"] == "bytes" and "vocab_map" not in meta


def test_out_dir_and_resume_continue_the_run(project):
    first = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "-o", "runs/a")
    assert first.exit_code == 0, first.output
    again = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=9",
                "-o", "runs/a", "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming from runs/a/step-00000006.safetensors" in again.stderr
    assert [s for s, _ in step_checkpoints(project / "runs/a")] == [3, 6, 9]
    # an explicit checkpoint after --resume
    third = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "-o", "runs/a",
                "--resume", "runs/a/step-00000003.safetensors")
    assert third.exit_code == 0, third.output
    assert "resuming from runs/a/step-00000003.safetensors" in third.stderr


def test_resume_without_a_checkpoint_is_a_one_line_error(project):
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "--resume")
    assert result.exit_code == 2
    assert "no resumable checkpoint in checkpoints/mini" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_positional_that_is_not_an_override_is_explained(project):
    result = llm("pretrain", "mini.yaml", "corpus.tokens")
    assert result.exit_code == 2
    assert "section.key=value" in result.stderr and "--resume PATH" in result.stderr


def test_token_ids_beyond_the_vocabulary_are_a_clear_error(project):
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "model.vocab_size=40")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "token id 47" in message and "model.vocab_size 40" in message
    assert "model.vocab_size=auto" in message
    assert "Traceback" not in result.output
    assert not (project / "checkpoints" / "mini").exists()


def test_compact_vocabulary_is_stored_and_unknown_ids_are_counted(project):
    tokens = markov_tokens(4000).astype(np.int64) * 1000  # sparse ids 0..47000
    tokens[3900:3910] = 99_999  # only in the validation part (the last 10%)
    write_tokens(project / "sparse.tokens", tokens, vocab_size=100_000)
    result = llm("pretrain", "mini.yaml", "data.source=sparse.tokens", "data.vocab=compact",
                 "-o", "runs/c")
    assert result.exit_code == 0, result.output
    meta = read_metadata(project / "runs/c/step-00000006.safetensors")
    reserved = reserved_ids(get_tokenizer("bytes")).tolist()  # end-of-text, template text
    expected = sorted({i * 1000 for i in range(48)} | set(reserved))
    assert meta["vocab_map"] == expected
    assert meta["recipe"]["model"]["vocab_size"] == len(expected) + 1  # + unknown
    assert "validation: 10 tokens" in result.stderr and "unknown id" in result.stderr


def test_ids_beyond_the_sidecars_largest_are_named_not_an_index_error(project):
    """A token file edited after its sidecar was written: counting the unknown validation ids
    indexed the compact lookup out of bounds."""
    tokens = markov_tokens(4000)
    path = write_tokens(project / "edited.tokens", tokens)
    data = np.fromfile(path, dtype="<u4")
    data[-10] = 200  # in the validation part, above the sidecar's max_id
    data.tofile(path)
    result = llm("pretrain", "mini.yaml", "data.source=edited.tokens", "data.vocab=compact",
                 "-o", "runs/e")
    assert result.exit_code == 2, result.output
    assert "edited.tokens: holds token id 200, beyond the" in result.stderr
    assert "Traceback" not in result.output


def test_dry_run_shows_provenance_budget_and_eta_without_training(project):
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.lr=0.002",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("train.lr", "override", "file", "default", "parameters", "memory",
                   "tokens/step     64", "Chinchilla", "ETA", "s/step measured"):
        assert needle in out, needle
    assert "auto from the corpus" in out
    assert not (project / "checkpoints").exists()
    memory = [line for line in out.splitlines() if "AdamW" in line]  # as llm params says
    assert len(memory) == 1 and "fp32: weights" in memory[0] and "bf16" not in memory[0][:40]
    assert "bf16 and fp16 autocast the compute" in " ".join(out.split())

    as_json = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "--dry-run", "--json")
    report = json.loads(as_json.stdout)
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["model.vocab_size"]["value"] == 48
    assert rows["train.max_iters"]["origin"] == "file"
    assert report["total_tokens"] == 6 * 64 and report["step_seconds"] > 0
    assert report["chinchilla_tokens"] == pytest.approx(20 * report["params"])
    assert list(report["memory"]) == ["fp32"]
    assert sum(report["memory"]["fp32"].values()) == 16 * report["params"]


def test_dry_run_stops_at_max_time_as_the_run_does(project):
    """max_iters=100000 with train.max_time set planned all 100,000 steps (and their ETA)
    though the run stops once its training steps have taken max_time seconds."""
    args = ("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=100000",
            "train.max_time=0.5", "train.eval_interval=100000", "--dry-run")
    report = json.loads(llm(*args, "--json").stdout)
    assert report["stopped_by"] == "max_time" and report["max_time"] == 0.5
    assert report["steps"] == math.ceil(0.5 / report["step_seconds"]) < 100_000
    assert report["total_tokens"] == report["steps"] * 64
    assert report["eta_seconds"] == pytest.approx(
        report["steps"] * report["step_seconds"] + report["eval_seconds"])
    text = " ".join(llm(*args).stdout.split())
    assert "train.max_time=0.5 s stops it after about" in text


def test_dry_run_eta_includes_the_evaluations_the_run_makes(project):
    """eval_interval=1 with eval_iters=100 made the run take many times the dry run's ETA,
    which counted training steps alone."""
    args = ("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=6",
            "train.eval_interval=4", "train.eval_iters=50")
    report = json.loads(llm(*args, "--dry-run", "--json").stdout)
    assert report["eval_batches"] == 100 and report["eval_batch_seconds"] > 0
    assert report["eval_seconds"] == pytest.approx(
        report["evaluations"] * 100 * report["eval_batch_seconds"])
    assert report["eta_seconds"] == pytest.approx(6 * report["step_seconds"]
                                                  + report["eval_seconds"])
    assert "evaluations of 100 batches" in " ".join(llm(*args, "--dry-run").stdout.split())
    trained = llm(*args, "-o", "run")
    assert trained.exit_code == 0, trained.output
    evals = [json.loads(line) for line in (project / "run" / "metrics.jsonl").open()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [0, 4, 6]
    assert report["evaluations"] == 3


def test_dry_run_for_several_processes_reports_once_for_all_of_them(project, monkeypatch):
    """`--dry-run --nproc 2` ran the dry run in each worker: two reports (two JSON documents),
    each with one process's tokens per step."""
    from llmcli.train import distributed

    def launched(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(distributed, "relaunch", launched)
    args = ("pretrain", "mini.yaml", "data.source=corpus.tokens", "--dry-run", "--nproc", "2")
    result = llm(*args)
    assert result.exit_code == 0, result.output
    assert "tokens/step     128 (2 processes x 64)" in result.stdout
    assert "on cpu x 2 processes" in result.stdout
    report = json.loads(llm(*args, "--json").stdout)
    assert report["processes"] == 2 and report["total_tokens"] == 6 * 128


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_warmup_as_long_as_the_run_is_warned_once_by_the_run_and_the_dry_run(project,
                                                                               schedule):
    """max_iters=6 with warmup_iters=100 was accepted silently: the peak lr is never reached."""
    args = ("pretrain", "mini.yaml", "data.source=corpus.tokens", f"train.lr_schedule={schedule}",
            "train.warmup_iters=100")
    for extra in (("--dry-run",), ()):
        result = llm(*args, *extra)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, result.stderr
        assert "train.warmup_iters=100 is not below the run's 6 steps" in warnings[0]
        assert ("cosine decay never starts" in warnings[0]) == (schedule == "cosine")
    quiet = llm(*args[:-1], "train.warmup_iters=5", "--dry-run")
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_data_records_is_said_to_be_unused_by_the_run_and_the_dry_run(project):
    """data.records was silently ignored by pretraining, which read every record."""
    args = ("pretrain", "mini.yaml", "data.source=corpus.tokens", "data.records=0:10")
    for extra in (("--dry-run",), ("-o", "with-records")):
        result = llm(*args, *extra)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == ["warning: data.records '0:10' selects the records `llm finetune` "
                            "uses; `llm pretrain` reads every record of data.source (drop the "
                            "key, or cut the file)"], result.stderr


def test_a_reader_of_the_messages_that_goes_away_does_not_end_the_run(project):
    """`llm pretrain ... 2>&1 >/dev/null | head -2`: the third message line met a closed pipe,
    and the run ended with exit 1 and nothing said, after --overwrite had cleared the old run."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "pretrain", "mini.yaml",
                             "data.source=corpus.tokens", "train.max_iters=6",
                             "train.eval_interval=1", "train.log_interval=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stderr.readline()  # the reader takes one line and leaves
    proc.stderr.close()
    stdout = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    assert stdout.startswith("step 6, train loss"), stdout
    assert [s for s, _ in step_checkpoints(project / "checkpoints" / "mini")][-1] == 6


def test_fine_tuning_keys_are_refused_on_the_command_line_and_said_unused_in_a_file(project):
    """`llm pretrain R lora.rank=8 finetune.init=runs/base` trained a full model from scratch,
    with no base and no adapters, and said nothing."""
    result = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "lora.rank=8",
                 "finetune.init=runs/base")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: lora.rank=8: `llm pretrain` trains a new model from "
                                    "scratch and uses no finetune.* or lora.* key; to fine-tune, "
                                    "run `llm finetune RECIPE lora.rank=8 finetune.init=runs/base`")
    assert not (project / "checkpoints").exists()
    recipe = yaml.safe_load((project / "mini.yaml").read_text())
    (project / "both.yaml").write_text(yaml.safe_dump(
        {**recipe, "lora": {"rank": 4}, "finetune": {"template": "alpaca-short"}}))
    for extra in (("--dry-run",), ("-o", "both")):
        result = llm("pretrain", "both.yaml", "data.source=corpus.tokens", "train.max_iters=2",
                     *extra)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == ["warning: finetune.template, lora.rank: `llm finetune`'s key(s), "
                            "unused by `llm pretrain`, which trains a new model from scratch "
                            "(fine-tune with `llm finetune RECIPE`)"], result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (("mini.yaml", "--json"), "error: --json goes with --dry-run or --keys"),
    (("--keys", "mini.yaml"), "error: --keys lists every recipe key and reads no recipe"),
    (("--keys", "--dry-run"), "error: --keys lists every recipe key and reads no recipe"),
])
def test_options_that_would_be_ignored_are_refused(project, args, expected):
    """`--json` trained with text output; `--keys R train.max_iters=abc` checked nothing."""
    result = llm("pretrain", *args)
    assert result.exit_code == 2 and result.stderr.startswith(expected), result.output
    assert not (project / "checkpoints").exists()


def test_keys_lists_the_values_of_every_key_with_a_fixed_set():
    """`train.precision` was 'auto = bf16 autocast on CUDA, fp32 elsewhere': fp16 was nowhere."""
    import typing

    from llmcli.recipe import SECTIONS

    rows = {r["key"]: r["doc"] for r in json.loads(llm("pretrain", "--keys", "--json").stdout)}
    for section, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.Literal:
                values = ", ".join(map(str, typing.get_args(hint)))
                assert rows[f"{section}.{name}"].endswith(f"; one of {values}"), name


def test_keys_lists_every_recipe_key_with_default_and_doc():
    result = llm("pretrain", "--keys", "--json")
    assert result.exit_code == 0
    rows = {r["key"]: r for r in json.loads(result.stdout)}
    assert rows["train.eval_interval"]["default"] == 50
    assert "evaluate every" in rows["train.eval_interval"]["doc"]
    assert {"data.vocab", "model.vocab_size", "train.precision", "lora.rank"} <= set(rows)
    table = llm("pretrain", "--keys")
    assert "train.checkpoint_interval" in table.stdout


def test_bad_recipe_input_exits_2_with_one_line(project):
    missing = llm("pretrain", "nope.yaml")
    assert missing.exit_code == 2 and "recipe file not found" in missing.stderr
    typo = llm("pretrain", "mini.yaml", "train.max_iter=5")
    assert typo.exit_code == 2 and "did you mean 'max_iters'" in typo.stderr
    no_recipe = llm("pretrain")
    assert no_recipe.exit_code == 2 and "missing RECIPE" in no_recipe.stderr


def test_pretraining_reuses_what_llm_tokenize_wrote(project):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    (project / "story.txt").write_text(text, encoding="utf-8")
    made = llm("tokenize", "story.txt", "--tokenizer", "bytes")
    assert made.exit_code == 0, made.output
    trained = llm("pretrain", "mini.yaml", "data.source=story.txt", "train.max_iters=3")
    assert trained.exit_code == 0, trained.output
    assert "using data/story.tokens" in trained.stderr
    assert sorted(p.name for p in (project / "data").glob("*.tokens")) == ["story.tokens"]


def test_a_list_of_sources_is_one_mixed_corpus(project):
    (project / "a.txt").write_text("alpha beta gamma. " * 200, encoding="utf-8")
    (project / "b.txt").write_text("delta epsilon zeta. " * 200, encoding="utf-8")
    result = llm("pretrain", "mini.yaml", "data.source=[a.txt, b.txt]", "data.vocab=compact",
                 "train.max_iters=3")
    assert result.exit_code == 0, result.output
    made = list((project / "data").glob("*.tokens"))
    assert [p.name for p in made] == ["a+b.bytes.tokens"]
    tokens = np.fromfile(made[0], dtype="<u4")
    assert int((tokens == 256).sum()) == 1  # end-of-text between the two documents
    again = llm("pretrain", "mini.yaml", "data.source=[a.txt, b.txt]", "data.vocab=compact",
                "train.max_iters=3", "-o", "runs/again")
    assert "using data/a+b.bytes.tokens" in again.stderr
    mixed_with_tokens = llm("pretrain", "mini.yaml", "data.source=[a.txt, corpus.tokens]",
                            "-o", "runs/mixed")
    assert mixed_with_tokens.exit_code == 2 and "cannot be mixed" in mixed_with_tokens.stderr


def test_a_resume_whose_vocabulary_lacks_the_new_document_start_says_so(monkeypatch, capsys):
    """A compact run begun before documents began with an imported tokenizer's BOS: resumed,
    its remade corpus mapped every document start to the unknown id without a word."""
    from types import SimpleNamespace

    from llmcli import pretrain
    from llmcli.data import tokenizer
    from llmcli.data.vocab import CompactVocab

    monkeypatch.setattr(tokenizer, "get_tokenizer", lambda name: SimpleNamespace(start_ids=(9,)))
    recipe = SimpleNamespace(data=SimpleNamespace(tokenizer="hf-test"))
    for ids, said in (([0, 5, 7], True), ([0, 5, 9], False)):
        pretrain._warn_unknown_starts(recipe, SimpleNamespace(vocab=CompactVocab(ids)), "run/x")
        err = capsys.readouterr().err
        assert ("run/x: its compact vocabulary has no id for the tokenizer's start id(s) 9"
                in " ".join(err.split())) is said, err
