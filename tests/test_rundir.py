"""Run directories over their life: interrupted writes, branches, runs that depend on each other,
and readers that race a training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_train import make_project, one_thread
from typer.testing import CliRunner

from llmcli.checkpoint import (
    Checkpoint,
    read_metadata,
    save_model,
    step_checkpoints,
    sweep_temp_files,
    trainer_path,
)
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.finetune import finetune
from llmcli.model.gpt import build_model
from llmcli.recipe import build_recipe
from llmcli.train.metrics import read_metrics

_threads = pytest.fixture(autouse=True)(one_thread)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FT_MODEL = {"vocab_size": 257, "context_length": 48, "d_model": 32, "num_blocks": 1,
            "num_heads": 4, "dropout": 0.0}
MODEL = {"vocab_size": 48, "context_length": 16, "d_model": 32, "num_blocks": 1, "num_heads": 4,
         "dropout": 0.0}


@pytest.fixture
def project(tmp_path, monkeypatch):
    return make_project(tmp_path, monkeypatch)


def llm(*args: str):
    return CliRunner().invoke(app, list(args))


def pretrain(*extra: str):
    return llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "-o", "runs/a",
               "model.vocab_size=257", *extra)  # end-of-text has an id: fine-tunes can use it


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def tiny(**train):
    return build_recipe({"name": "t", "data": {"vocab": "full", "tokenizer": "bytes"},
                         "model": dict(MODEL, vocab_size=256), "train": train})


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A byte-level base checkpoint, as `llm pretrain` would write it, with trainer state."""
    recipe = build_recipe({"name": "base", "data": {"tokenizer": "bytes"}, "model": FT_MODEL})
    torch.manual_seed(0)
    path = tmp_path / "base" / "step-00000010.safetensors"
    save_model(path, build_model(recipe.model), recipe, tokenizer="bytes", step=10)
    return path


@pytest.fixture
def records(tmp_path: Path) -> Path:
    data = [{"instruction": f"{i}?", "input": "", "output": "red"} for i in range(40)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def ft_recipe(base: Path, records: Path, *overrides: str):
    return build_recipe({
        "name": "ft", "data": {"source": str(records), "val_fraction": 0.2},
        "finetune": {"init": str(base), "template": "Q: {instruction}\n{input}\nA: "},
        "lora": {"rank": 2},
        "train": {"batch_size": 4, "max_iters": 4, "eval_interval": 2, "eval_iters": 1,
                  "log_interval": 1, "checkpoint_interval": 2, "precision": "fp32"},
    }, list(overrides))


# ---------------------------------------------------------------------------------------------
# A kill during a save


KILLED_IN_SAVE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import safetensors.torch as st
    sys.path.insert(0, {tests!r})
    from test_rundir import tiny
    from llmcli.checkpoint import save_model
    from llmcli.model.gpt import build_model

    def killed(tensors, filename, metadata=None):
        # what safetensors does: its own temporary beside the path it was given, then a rename
        Path(filename).parent.joinpath(".tmpAbC123").write_bytes(b"")
        os._exit(137)
    st.serialize_file = killed
    recipe = tiny()
    save_model(Path({run!r}) / "step-00000001.safetensors", build_model(recipe.model), recipe)
""")


def test_a_kill_inside_the_safetensors_writer_leaves_only_what_the_sweep_removes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = KILLED_IN_SAVE.format(tests=str(ROOT / "tests"), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, env=ENV,
                          text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    assert list(run.iterdir())  # something was left...
    sweep_temp_files(run)
    assert list(run.iterdir()) == []  # ...and all of it was the project's to remove


def test_safetensors_temporaries_of_older_versions_are_swept_only_when_ours(tmp_path):
    recipe = tiny()
    save_model(tmp_path / "w.safetensors", build_model(recipe.model), recipe)
    ours = tmp_path / ".tmpXy12Z9"
    data = (tmp_path / "w.safetensors").read_bytes()
    ours.write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 100])  # killed mid-write
    foreign = tmp_path / ".tmpQq77Rr"
    foreign.write_bytes(b"someone else's")
    swept = sweep_temp_files(tmp_path)
    assert swept == [ours] and foreign.exists() and (tmp_path / "w.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# A run killed before its first checkpoint


def test_a_run_without_a_resumable_checkpoint_is_not_sent_back_and_forth(project):
    assert pretrain().exit_code == 0
    run = project / "runs/a"
    for _, path in step_checkpoints(run):  # as if killed before the first checkpoint
        trainer_path(path).unlink()
        path.unlink()
    fresh = pretrain()
    assert fresh.exit_code == 2 and "--overwrite" in fresh.stderr
    assert "continue it with --resume" not in fresh.stderr
    resumed = pretrain("--resume")
    assert resumed.exit_code == 2 and "start again with --overwrite" in resumed.stderr
    assert len(resumed.stderr.strip().splitlines()) == 1
    assert pretrain("--overwrite").exit_code == 0


# ---------------------------------------------------------------------------------------------
# Reading a run directory while a run trains there (and prunes)


def two_steps(run: Path) -> None:
    recipe = tiny()
    for step in (1, 2):
        save_model(run / f"step-{step:08d}.safetensors", build_model(recipe.model), recipe,
                   step=step)


def test_a_step_pruned_between_choosing_and_reading_gives_way_to_the_newest(tmp_path):
    two_steps(tmp_path)
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.meta["step"] == 2
    (tmp_path / "step-00000002.safetensors").unlink()  # the training run pruned it
    ckpt.load()
    assert ckpt.meta["step"] == 1 and ckpt.path.name == "step-00000001.safetensors"


def test_a_step_pruned_while_its_metadata_is_read_gives_way_too(tmp_path, monkeypatch):
    import llmcli.checkpoint as checkpoint

    two_steps(tmp_path)
    real = checkpoint.damage
    newest = tmp_path / "step-00000002.safetensors"

    def pruned_after_check(path):
        problem = real(path)
        if path == newest and path.exists():
            path.unlink()
        return problem

    monkeypatch.setattr(checkpoint, "damage", pruned_after_check)
    assert Checkpoint.open(tmp_path).meta["step"] == 1


def test_a_named_file_that_vanishes_says_so(tmp_path):
    two_steps(tmp_path)
    ckpt = Checkpoint.open(tmp_path / "step-00000002.safetensors")
    (tmp_path / "step-00000002.safetensors").unlink()
    with pytest.raises(UserError, match="removed while it was being read"):
        ckpt.load()


# ---------------------------------------------------------------------------------------------
# Fine-tuning runs


def test_merge_on_a_resume_already_at_its_last_step_merges_the_newest_adapter(
        base, records, tmp_path):
    run = tmp_path / "lora"
    finetune(ft_recipe(base, records), run_dir=run, device="cpu")
    again = finetune(ft_recipe(base, records), run_dir=run, device="cpu", resume=True, merge=True)
    assert again.merged == run / "merged.safetensors" and again.merged.exists()
    assert read_metadata(again.merged)["merged_from"].endswith("step-00000004.safetensors")


def test_each_command_resumes_only_its_own_kind_of_run(project, records):
    assert pretrain().exit_code == 0
    base = project / "runs/a/step-00000006.safetensors"
    finetune(ft_recipe(base, records, "lora.rank=0"), run_dir=project / "runs/ft", device="cpu")
    before = snapshot(project / "runs/ft")
    wrong = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "-o", "runs/ft",
                "model.vocab_size=257", "--resume", "train.max_iters=9")
    assert wrong.exit_code == 2 and "runs/ft is a fine-tuning run" in wrong.stderr
    assert "llm finetune" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    assert snapshot(project / "runs/ft") == before
    with pytest.raises(UserError, match="runs/a is a pretraining run; resume it with llm pretrain"):
        finetune(ft_recipe(base, records, "train.max_iters=9"), run_dir=project / "runs/a",
                 device="cpu", resume=True)


def test_pruning_and_overwrite_keep_a_step_file_another_runs_adapter_is_based_on(
        project, records):
    assert pretrain().exit_code == 0
    base = project / "runs/a/step-00000003.safetensors"
    finetune(ft_recipe(base, records), run_dir=project / "runs/lo", device="cpu")
    resumed = pretrain("train.max_iters=12", "train.keep_last=1", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [s for s, _ in step_checkpoints(project / "runs/a")] == [3, 12]
    assert "kept runs/a/step-00000003.safetensors beyond train.keep_last" in resumed.stderr
    Checkpoint.open(project / "runs/lo").load()  # the adapter still finds its base
    over = pretrain("--overwrite")
    assert over.exit_code == 2 and "is the base of the LoRA run" in over.stderr
    assert base.exists()


def test_a_best_file_another_runs_adapter_is_based_on_is_kept(project, records):
    """A LoRA run from runs/a/best.safetensors broke when runs/a went on improving (best was
    rewritten) or was --overwrite-n (only step files were guarded)."""
    assert pretrain().exit_code == 0
    best = project / "runs/a/best.safetensors"
    before = best.read_bytes()
    finetune(ft_recipe(best, records), run_dir=project / "runs/lo", device="cpu")
    resumed = pretrain("train.max_iters=30", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "kept runs/a/best.safetensors as it is: it is the base of the LoRA run" in \
        resumed.stderr
    assert resumed.stderr.count("kept runs/a/best") == 1  # once, not at every improvement
    assert best.read_bytes() == before
    Checkpoint.open(project / "runs/lo").load()  # the adapter still finds its base unchanged
    over = pretrain("--overwrite")
    assert over.exit_code == 2 and "best.safetensors is the base of the LoRA run" in over.stderr
    assert best.read_bytes() == before


def test_a_base_pruned_while_a_lora_run_starts_is_picked_again(project, records, monkeypatch):
    """finetune.init=RUN with RUN still training: the step picked was pruned before it was read
    ('no such file or directory; check the path'), and nothing kept it until the run's end."""
    import llmcli.finetune as ft

    assert pretrain().exit_code == 0
    run = project / "runs/a"
    real, calls = ft.load_model, []

    def pruned_first(path, *args, **kwargs):
        calls.append(Path(path).name)
        assert list(path.parent.glob(f".{path.name}.used-by.*")), "read before it was marked"
        if len(calls) == 1:  # the training run prunes the newest step just after the pick
            for victim in (path, trainer_path(path)):
                victim.unlink()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ft, "load_model", pruned_first)
    finetune(ft_recipe(run, records), run_dir=project / "runs/lo", device="cpu")
    assert calls == ["step-00000006.safetensors", "step-00000003.safetensors"]
    assert Checkpoint.open(project / "runs/lo").base_path.name == "step-00000003.safetensors"


def files_of(run: Path) -> dict[str, bytes]:
    """A run's files, without the markers a LoRA start leaves beside its base."""
    return {name: data for name, data in snapshot(run).items() if not name.startswith(".")}


def test_a_run_refused_on_its_inputs_leaves_the_run_it_would_overwrite(project, records):
    """--overwrite deleted the earlier run before the new one's inputs were read: a base that
    was that very run (or a file in it), empty records, a misspelt finetune.init or a corpus
    too small for the context left an empty directory, and no run at all."""
    assert pretrain().exit_code == 0
    run = project / "runs/a"
    before = files_of(run)
    step = run / "step-00000006.safetensors"
    for init in (run, step):
        for lora in ("lora.rank=2", "lora.rank=0"):
            with pytest.raises(UserError, match=rf"^finetune.init {step}: inside the run "
                               rf"directory {run}, which --overwrite would clear; write this "
                               "run elsewhere with -o DIR") as caught:
                finetune(ft_recipe(init, records, lora), run_dir=run, device="cpu",
                         overwrite=True)
            assert caught.value.exit_code == 2 and files_of(run) == before
    small = pretrain("model.context_length=4096", "--overwrite")  # 3,600 training tokens
    assert small.exit_code == 2 and "fewer than context_length" in small.stderr
    assert files_of(run) == before
    ft = project / "runs/ft"
    finetune(ft_recipe(step, records), run_dir=ft, device="cpu")
    earlier = files_of(ft)
    (project / "empty.json").write_text("[]", encoding="utf-8")
    for bad in ("data.source=empty.json", "finetune.init=runs/typo"):
        with pytest.raises(UserError):
            finetune(ft_recipe(step, records, bad), run_dir=ft, device="cpu", overwrite=True)
        assert files_of(ft) == earlier
    finetune(ft_recipe(step, records), run_dir=ft, device="cpu", overwrite=True)  # still works
    assert files_of(ft).keys() == earlier.keys()


def test_a_group_is_refused_an_input_it_would_clear_before_it_starts(project, records):
    """`--nproc 2` is told before any process starts (each would load the base and the
    records first, then rank 0 would refuse)."""
    assert pretrain().exit_code == 0
    run = project / "runs/a"
    before = files_of(run)
    (project / "ft.yaml").write_text(json.dumps({
        "data": {"source": str(records)}, "finetune": {"init": "runs/a"},
        "lora": {"rank": 2}, "train": {"max_iters": 2}}), encoding="utf-8")
    group = llm("finetune", "ft.yaml", "-o", "runs/a", "--overwrite", "--nproc", "2")
    assert group.exit_code == 2 and group.stderr == (
        "error: finetune.init runs/a/step-00000006.safetensors: inside the run directory "
        "runs/a, which --overwrite would clear; write this run elsewhere with -o DIR (or move "
        "the input out first)\n")
    assert files_of(run) == before


# ---------------------------------------------------------------------------------------------
# Resuming from an older step: a new branch


def test_resuming_an_older_step_moves_the_abandoned_branch_aside(project):
    assert pretrain("train.max_iters=9").exit_code == 0
    run = project / "runs/a"
    old = snapshot(run)
    branch = pretrain("train.max_iters=6", "train.lr=0.01", "--resume",
                      "runs/a/step-00000003.safetensors")
    assert branch.exit_code == 0, branch.output
    assert "moved to runs/a/abandoned-" in branch.stderr
    # the branch's own steps only: nothing newer than it is left to be picked up
    assert [s for s, _ in step_checkpoints(run)] == [3, 6]
    assert Checkpoint.open(run).meta["step"] == 6
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 6
    # ...and nothing of the old branch is lost
    (aside,) = [p for p in run.iterdir() if p.is_dir()]
    assert {"step-00000009.safetensors", "metrics.jsonl"} <= {p.name for p in aside.iterdir()}
    assert (aside / "step-00000006.safetensors").read_bytes() == old["step-00000006.safetensors"]
    assert pretrain("train.max_iters=6", "--resume").stderr.count("moved") == 0


def test_a_renamed_older_step_still_sets_the_newer_branch_aside(project):
    """Resuming from an older step under another name (foo.safetensors) replaced the newer
    steps and best without a word: the step was read from the file name only."""
    assert pretrain("train.max_iters=9").exit_code == 0
    run = project / "runs/a"
    old = snapshot(run)
    for name in ("step-00000003.safetensors", "step-00000003.trainer.safetensors"):
        os.replace(run / name, run / name.replace("step-00000003", "foo"))
    branch = pretrain("train.max_iters=9", "train.lr=0.01", "--resume", "runs/a/foo.safetensors")
    assert branch.exit_code == 0, branch.output
    assert "moved to runs/a/abandoned-" in branch.stderr
    (aside,) = [p for p in run.iterdir() if p.is_dir()]
    assert (aside / "step-00000009.safetensors").read_bytes() == old["step-00000009.safetensors"]


def test_resuming_another_directory_into_a_run_of_its_own_is_refused(project):
    """`-o old --resume other/step-3` cut old's metrics, replaced its best, and pruned the
    branch's own new steps in favour of old's higher ones."""
    assert pretrain("train.max_iters=6").exit_code == 0
    assert llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=6",
               "model.vocab_size=257", "-o", "runs/other").exit_code == 0
    before = snapshot(project / "runs/a")
    mixed = pretrain("train.max_iters=6", "--resume", "runs/other/step-00000003.safetensors")
    assert mixed.exit_code == 2
    assert mixed.stderr.startswith("error: --resume runs/other/step-00000003.safetensors: "
                                   "runs/a holds a run of its own"), mixed.stderr
    assert snapshot(project / "runs/a") == before
    elsewhere = llm("pretrain", "mini.yaml", "data.source=corpus.tokens", "train.max_iters=6",
                    "model.vocab_size=257", "-o", "runs/branch", "--resume",
                    "runs/other/step-00000003.safetensors")
    assert elsewhere.exit_code == 0, elsewhere.output  # a new directory is the way
    assert [s for s, _ in step_checkpoints(project / "runs/branch")] == [6]


def test_only_the_main_process_of_a_group_changes_the_run_directory(tmp_path):
    """A refused `--overwrite --nproc 2` deleted the running run's checkpoints: rank 1 swept and
    deleted while rank 0 was refused the lock. The others now only take rank 0's outcome."""
    from llmcli.checkpoint import claim_run_dir
    from llmcli.console import Echoed
    from llmcli.files import locked

    run = tmp_path / "run"
    run.mkdir()
    kept = [run / "step-00000002.safetensors", run / "metrics.jsonl", run / ".best.x.tmp"]
    for path in kept:
        path.write_bytes(b"x")
    with claim_run_dir(run, resume=None, overwrite=True, main=False,
                       share=lambda _: (run / "step-00000002.safetensors", None)) as claim:
        assert claim.resume == run / "step-00000002.safetensors"  # what the main process chose
        claim.start()  # the main process clears; this one only waits for its outcome
    assert all(path.exists() for path in kept)
    with pytest.raises(Echoed) as refused, claim_run_dir(run, resume=None, overwrite=True,
                                                         main=False, share=lambda _: (None, 2)):
        pass
    assert refused.value.exit_code == 2 and all(path.exists() for path in kept)
    shared = []
    with locked(run, wait=False), pytest.raises(UserError, match="in use by another run"), \
            claim_run_dir(run, resume=None, overwrite=True, share=shared.append):
        pass
    assert shared == [(None, 2)]  # the refusal's exit code, told to the others
    assert all(path.exists() for path in kept)
    shared.clear()
    with claim_run_dir(run, resume=None, overwrite=True,
                       share=lambda outcome: shared.append(outcome) or outcome) as claim:
        assert all(path.exists() for path in kept)  # nothing goes before the inputs are read
        with pytest.raises(UserError, match="inside the run directory"):
            claim.start([("finetune.init", run / "step-00000002.safetensors")])
    assert shared == [(None, None), (None, 2)]  # claimed, then the refusal told to the others
    assert all(path.exists() for path in kept)
