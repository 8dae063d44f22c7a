"""Resume and safety: exact continuation, atomic checkpoints, Ctrl-C, shape mismatches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers_train import markov_tokens, one_thread, tiny_recipe

from llmcli.checkpoint import (
    claim_run_dir,
    load_model,
    resolve_resume,
    step_checkpoints,
    trainer_path,
)
from llmcli.console import UserError
from llmcli.data.batches import TokenWindows
from llmcli.model.gpt import build_model
from llmcli.recipe import build_recipe
from llmcli.train.loop import train
from llmcli.train.metrics import read_metrics

_threads = pytest.fixture(autouse=True)(one_thread)

ROOT = Path(__file__).resolve().parents[1]
TOKENS = markov_tokens(6000)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fresh(overrides=(), **train_kw):
    """Model and batches exactly as a new process would build them for this recipe."""
    recipe = build_recipe(tiny_recipe(**train_kw), list(overrides))
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model)
    batches = TokenWindows(TOKENS, 5400, recipe.train.batch_size, recipe.model.context_length,
                           seed=recipe.train.seed)
    return recipe, model, batches


def copy_checkpoint(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in (src, trainer_path(src)):
        shutil.copy2(path, dst_dir / path.name)
    return dst_dir / src.name


# Dropout, a cosine schedule with warmup, gradient accumulation and clipping all consume or
# depend on state that must survive the restart.
EXACT = dict(max_iters=12, checkpoint_interval=4, eval_interval=3, lr_schedule="cosine",
             warmup_iters=3, min_lr=1e-4, grad_accum=2, grad_clip=0.5)


def test_resumed_run_matches_the_uninterrupted_one_step_for_step(tmp_path):
    recipe, model, batches = fresh(**EXACT)
    full = train(recipe, model, batches, tmp_path / "full", device="cpu")
    assert sorted(full.losses) == list(range(1, 13))

    # A second process that restarts from the step-8 checkpoint (a crash after step 8).
    start = copy_checkpoint(tmp_path / "full" / "step-00000008.safetensors", tmp_path / "again")
    recipe2, model2, batches2 = fresh(**EXACT)
    resumed = train(recipe2, model2, batches2, tmp_path / "again", device="cpu", resume=start)
    assert sorted(resumed.losses) == [9, 10, 11, 12]
    for step in range(9, 13):
        assert resumed.losses[step] == full.losses[step], step  # bit-exact on CPU
    assert [e["step"] for e in resumed.evals] == [e["step"] for e in full.evals]
    assert resumed.evals[-1] == full.evals[-1]
    a, _, _, _ = load_model(tmp_path / "full" / "step-00000012.safetensors")
    b, _, _, _ = load_model(tmp_path / "again" / "step-00000012.safetensors")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_resume_after_the_end_with_more_steps_and_metrics_continue(tmp_path):
    recipe, model, batches = fresh(max_iters=6, eval_interval=3, checkpoint_interval=3)
    train(recipe, model, batches, tmp_path, device="cpu")
    recipe2, model2, batches2 = fresh(max_iters=9, eval_interval=3, checkpoint_interval=3)
    result = train(recipe2, model2, batches2, tmp_path, device="cpu",
                   resume=tmp_path / "step-00000006.safetensors")
    assert sorted(result.losses) == [7, 8, 9]
    evals = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [0, 3, 6, 9]  # no duplicate of step 6


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    recipe, model, batches = fresh(max_iters=8, eval_interval=2, checkpoint_interval=4)
    train(recipe, model, batches, tmp_path, device="cpu")
    recipe2, model2, batches2 = fresh(max_iters=8, eval_interval=2, checkpoint_interval=4)
    train(recipe2, model2, batches2, tmp_path, device="cpu",
          resume=tmp_path / "step-00000004.safetensors")
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [2, 4, 6, 8]


def test_shape_mismatch_on_resume_names_the_keys(tmp_path):
    recipe, model, batches = fresh(max_iters=2, checkpoint_interval=2)
    train(recipe, model, batches, tmp_path, device="cpu")
    recipe2, model2, batches2 = fresh(["model.d_model=48"], max_iters=4)
    with pytest.raises(UserError) as info:
        train(recipe2, model2, batches2, tmp_path / "b", device="cpu",
              resume=tmp_path / "step-00000002.safetensors")
    message = str(info.value)
    assert "tok_emb.weight (64, 32) vs recipe (64, 48)" in message
    assert "more" in message and "\n" not in message
    assert not (tmp_path / "b" / "step-00000004.safetensors").exists()


CRASHING_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import safetensors.torch as st
    import torch
    from helpers_train import markov_tokens, tiny_recipe
    from llmcli.data.batches import TokenWindows
    from llmcli.model.gpt import build_model
    from llmcli.recipe import build_recipe
    from llmcli.train.loop import train

    real = st.save_model
    def crashing(model, filename, metadata=None):
        if "00000004" in filename or "00000004" in str(metadata):
            real(model, filename, metadata=metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as fh:
                fh.truncate(size // 2)  # half-written...
            os._exit(137)  # ...and the process is killed: no cleanup runs
        return real(model, filename, metadata=metadata)
    st.save_model = crashing

    recipe = build_recipe(tiny_recipe(max_iters=6, checkpoint_interval=2, eval_interval=100))
    torch.manual_seed(0)
    model = build_model(recipe.model)
    batches = TokenWindows(markov_tokens(6000), 5400, 4, 16)
    train(recipe, model, batches, {run!r}, device="cpu")
""")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    script = CRASHING_SAVE.format(tests=str(ROOT / "tests"), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, env=ENV,
                          text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    # The half-written file is a temporary; the step-4 name never appeared.
    assert [s for s, _ in step_checkpoints(run)] == [2]
    assert list(run.glob(".step-00000004.safetensors.*.tmp"))
    model, _, meta, _ = load_model(run / "step-00000002.safetensors")
    assert meta["step"] == 2
    assert resolve_resume(True, run).name == "step-00000002.safetensors"
    recipe, model, batches = fresh(max_iters=4, checkpoint_interval=2, eval_interval=100)
    result = train(recipe, model, batches, run, device="cpu",
                   resume=run / "step-00000002.safetensors")
    assert result.step == 4


INTERRUPTIBLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from helpers_train import markov_tokens, tiny_recipe
    from llmcli.console import run_guarded
    from llmcli.data.batches import TokenWindows
    from llmcli.model.gpt import build_model
    from llmcli.recipe import build_recipe
    from llmcli.train.loop import train

    class Slow(TokenWindows):
        def get_batch(self, split, purpose="train"):
            print("step" if purpose == "train" else "eval", flush=True)
            time.sleep(0.2 if purpose == "train" else {eval_sleep})
            return super().get_batch(split, purpose)

    recipe = build_recipe(tiny_recipe(max_iters=1000, checkpoint_interval=1000,
                                      eval_interval=1000, eval_iters={eval_iters}))
    torch.manual_seed(0)
    model = build_model(recipe.model)
    batches = Slow(markov_tokens(6000), 5400, 4, 16)
    run_guarded(lambda: train(recipe, model, batches, {run!r}, device="cpu"))
""")


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path):
    run = tmp_path / "run"
    script = INTERRUPTIBLE.format(tests=str(ROOT / "tests"), run=str(run), eval_sleep=0.0,
                                  eval_iters=2)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        seen = 0
        deadline = time.monotonic() + 120
        while seen < 5 and time.monotonic() < deadline:  # a few steps into training
            if proc.stdout.readline().strip() == "step":
                seen += 1
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    saved = step_checkpoints(run)
    assert len(saved) == 1 and trainer_path(saved[0][1]).exists()
    step = saved[0][0]
    assert 2 <= step < 1000  # 5 train draws: 2 for the step-0 evaluation, then steps
    assert f"interrupted: stopped at step {step}" in stderr and "--resume" in stderr
    assert "error:" not in stderr
    assert "Traceback" not in stderr
    _, _, meta, _ = load_model(saved[0][1])
    assert meta["step"] == step


def test_ctrl_c_during_an_evaluation_abandons_it_at_once(tmp_path):
    """The step-0 evaluation would take 100 s here; Ctrl-C ends the process within seconds."""
    run = tmp_path / "run"
    script = INTERRUPTIBLE.format(tests=str(ROOT / "tests"), run=str(run), eval_sleep=0.5,
                                  eval_iters=100)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while proc.stdout.readline().strip() != "eval" and time.monotonic() < deadline:
            pass
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert took < 30  # one batch of 0.5 s, not the remaining 100 s
    assert "nothing was saved" in stderr and "Traceback" not in stderr
    assert step_checkpoints(run) == []


def test_a_full_disk_at_the_weights_names_them_and_leaves_no_state_without_weights(
        tmp_path, monkeypatch):
    """The disk filled after the trainer state of step 4 was written: the error named no file,
    and step-4's trainer state stayed without its weights."""
    import errno

    import safetensors.torch as st

    real = st.save_model

    def full_at_step_4(model, filename, metadata=None):
        if "00000004" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_model", full_at_step_4)
    recipe, model, batches = fresh(max_iters=4, checkpoint_interval=2, eval_interval=100)
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(recipe, model, batches, run, device="cpu")
    assert info.value.exit_code == 1
    assert str(info.value) == (f"{run / 'step-00000004.safetensors'}: no space left on the "
                               "device; free some space or choose another output path")
    assert sorted(p.name for p in run.iterdir() if "step" in p.name) == [
        "step-00000002.safetensors", "step-00000002.trainer.safetensors"]
    assert resolve_resume(True, run).name == "step-00000002.safetensors"


def test_weights_replaced_after_the_save_are_not_resumed(tmp_path):
    """A step file and its trainer state carry one save id: weights copied or merged over the
    step file would otherwise continue with another run's optimizer state."""
    recipe, model, batches = fresh(max_iters=4, checkpoint_interval=2, eval_interval=100)
    run = tmp_path / "run"
    train(recipe, model, batches, run, device="cpu")
    other = tmp_path / "other"
    recipe, model, batches = fresh(["train.seed=5"], max_iters=4, checkpoint_interval=2,
                                   eval_interval=100)
    train(recipe, model, batches, other, device="cpu")
    shutil.copy2(other / "step-00000004.safetensors", run / "step-00000004.safetensors")
    with pytest.raises(UserError, match="were not saved together \\(save_id"):
        resolve_resume(True, run)
    assert resolve_resume("auto", run).name == "step-00000002.safetensors"


def test_a_symlink_to_a_run_in_use_meets_its_lock(tmp_path):
    """`-o link` to a training run's directory took a lock of its own (.link.lock), and its
    --overwrite deleted the running run's checkpoints."""
    run, link, outer = tmp_path / "run", tmp_path / "link", tmp_path / "outer"
    run.mkdir()
    link.symlink_to(run)
    outer.symlink_to(tmp_path)
    with claim_run_dir(run, resume=None, overwrite=False):
        for alias in (link, outer / "run", outer / "link"):
            with pytest.raises(UserError, match="in use by another run"), \
                    claim_run_dir(alias, resume=None, overwrite=True):
                pass


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run with intact steps 2 and 4, to copy and damage."""
    run = tmp_path_factory.mktemp("four") / "run"
    recipe, model, batches = fresh(max_iters=4, checkpoint_interval=2, eval_interval=2)
    train(recipe, model, batches, run, device="cpu")
    return run


def damage_trainer_state(run: Path, patch) -> Path:
    """Rewrite the step-4 trainer state with `patch(meta, tensors)` applied (raw metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = trainer_path(run / "step-00000004.safetensors")
    with safe_open(str(state), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    patch(meta, tensors)
    save_file(tensors, str(state), metadata=meta)
    return state


def moments(index: int, exp_avg, exp_avg_sq=None):
    def patch(meta, tensors):
        tensors[f"optim.{index}.exp_avg"] = exp_avg(tensors[f"optim.{index}.exp_avg"])
        if exp_avg_sq is not None:
            tensors[f"optim.{index}.exp_avg_sq"] = exp_avg_sq(tensors[f"optim.{index}.exp_avg"])
    return patch


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("patch, words", [
    (lambda m, t: m.pop("optimizer"), "field 'optimizer' is missing"),
    (lambda m, t: t.pop("optim.0.exp_avg"), "tensor optim.0.exp_avg is missing"),
    (lambda m, t: t.__setitem__("rank0.rng.torch", torch.zeros(5, dtype=torch.uint8)),
     "tensor rank0.rng.torch is U8 [5], not the U8 [5056]"),
    (lambda m, t: m.__setitem__("rng", '{"0": 5}'), "field 'rng' entry '0'"),
    (lambda m, t: m.__setitem__("rng", '{}'), "field 'rng' does not hold one entry per process"),
    (lambda m, t: m.__setitem__("evals", "[1, 2]"), "field 'evals'"),
    (lambda m, t: m.__setitem__("tokens", '"many"'), "field 'tokens' is 'many', not a count"),
    (lambda m, t: m.__setitem__("best_val", '"x"'), "field 'best_val' is 'x', not a loss"),
    (lambda m, t: m.__setitem__("world_size", "0"), "field 'world_size' is '0'"),
    (lambda m, t: m.__setitem__("step", "null"), "field 'step'"),
    (moments(0, lambda t: torch.zeros(3)), "tensor optim.0.exp_avg_sq has shape"),
    (moments(1, with_nan), "tensor optim.1.exp_avg holds NaN or Inf values"),
    (moments(1, lambda t: t, lambda t: -t.abs() - 1), "tensor optim.1.exp_avg_sq holds negative"),
    (moments(1, lambda t: t.to(torch.int64)), "tensor optim.1.exp_avg is I64; expected a float"),
    (lambda m, t: t.__setitem__("rank0.rng.python", torch.full((625,), 2**40)),
     "tensor rank0.rng.python holds values beyond 32 bits"),
    (lambda m, t: t.__setitem__("stray", torch.zeros(1)), "tensor stray has no place"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_a_damaged_trainer_state_is_named_by_file_and_field_and_auto_passes_it(
        four_steps, tmp_path, patch, words):
    """These were KeyErrors and TypeErrors (exit 1), or accepted: a moment of another shape
    then gave a NaN loss blamed on the learning rate, world_size 0 a note on ranks 0 to -1."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    state = damage_trainer_state(run, patch)
    with pytest.raises(UserError) as info:
        resolve_resume(True, run)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message
    assert f"({state.name}: {words}" in message, message
    assert "step-00000002.safetensors: rerun with --resume auto" in message
    assert resolve_resume("auto", run).name == "step-00000002.safetensors"


def test_a_trainer_state_of_twelve_processes_is_intact(four_steps, tmp_path):
    """Ranks 10 and 11 sort before 2 as text: the check must not take that for damage."""
    def twelve(meta, tensors):
        rng = json.loads(meta["rng"])
        for rank in range(1, 12):
            rng[str(rank)] = rng["0"]
            tensors.update({k.replace("rank0.", f"rank{rank}.", 1): v.clone()
                            for k, v in list(tensors.items()) if k.startswith("rank0.")})
        meta.update(rng=json.dumps(rng), world_size="12")

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage_trainer_state(run, twelve)
    assert resolve_resume(True, run).name == "step-00000004.safetensors"


def test_a_trainer_state_that_does_not_fit_the_model_is_named_by_tensor(four_steps, tmp_path):
    """Both moments of another shape agree with each other: only the model tells."""
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    zeros = lambda t: torch.zeros(3)  # noqa: E731
    state = damage_trainer_state(run, moments(0, zeros, zeros))
    recipe, model, batches = fresh(max_iters=6, checkpoint_interval=2, eval_interval=2)
    with pytest.raises(UserError) as info:
        train(recipe, model, batches, run, device="cpu",
              resume=resolve_resume(True, run))
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{state}: trainer state tensor optim.0.exp_avg has shape "
                                      "(3,), but its parameter has (64, 32)")
    assert not (run / "step-00000006.safetensors").exists()


def test_one_run_at_a_time_per_directory(tmp_path):
    run = tmp_path / "run"
    busy = f"{run} is in use by another run \\(process {os.getpid()}\\)"
    with claim_run_dir(run, resume=None, overwrite=False):
        with pytest.raises(UserError, match=busy), \
                claim_run_dir(run, resume=None, overwrite=False):
            pass
        with claim_run_dir(run, resume=None, overwrite=False, main=False):
            pass  # the other ranks of the same run do not take the lock
    with claim_run_dir(run, resume=None, overwrite=False):
        pass  # released
    assert not list(tmp_path.glob(".*.lock"))
    with pytest.raises(UserError, match="--resume and --overwrite contradict"), \
            claim_run_dir(run, resume=True, overwrite=True):
        pass


WINDOWS = dict(max_iters=12, eval_interval=4, checkpoint_interval=4, eval_iters=2)


def evals_by_step(result):
    return {e["step"]: e for e in result.evals}


def test_a_stop_time_evaluation_leaves_later_evaluations_on_the_uninterrupted_windows(tmp_path):
    recipe, model, batches = fresh(**WINDOWS)
    full = evals_by_step(train(recipe, model, batches, tmp_path / "full", device="cpu"))
    recipe, model, batches = fresh(**{**WINDOWS, "max_iters": 6})  # evaluates at step 6 too
    train(recipe, model, batches, tmp_path / "short", device="cpu")
    recipe, model, batches = fresh(**WINDOWS)
    resumed = evals_by_step(train(recipe, model, batches, tmp_path / "short", device="cpu",
                                  resume=tmp_path / "short" / "step-00000006.safetensors"))
    assert resumed[8] == full[8] and resumed[12] == full[12]


class CtrlCInEval(TokenWindows):
    """Ctrl-C on the `at`-th evaluation draw: that evaluation is abandoned, the run saves."""

    at = 10  # the second draw of the step-8 evaluation (4 draws per evaluation)
    draws = 0

    def get_batch(self, split, purpose="train"):
        if purpose == "eval":
            self.draws += 1
            if self.draws == self.at:
                signal.raise_signal(signal.SIGINT)
        return super().get_batch(split, purpose)


def test_an_abandoned_evaluation_leaves_later_evaluations_on_the_uninterrupted_windows(tmp_path):
    recipe, model, batches = fresh(**WINDOWS)
    full = evals_by_step(train(recipe, model, batches, tmp_path / "full", device="cpu"))
    recipe, model, _ = fresh(**WINDOWS)
    batches = CtrlCInEval(TOKENS, 5400, recipe.train.batch_size, recipe.model.context_length,
                          seed=recipe.train.seed)
    with pytest.raises(UserError, match="stopped at step 8"):
        train(recipe, model, batches, tmp_path / "cut", device="cpu")
    recipe, model, batches = fresh(**WINDOWS)
    resumed = evals_by_step(train(recipe, model, batches, tmp_path / "cut", device="cpu",
                                  resume=tmp_path / "cut" / "step-00000008.safetensors"))
    assert resumed[8] == full[8] and resumed[12] == full[12]


@pytest.mark.parametrize("override", ["train.seed=5", "data.val_fraction=0.3"])
def test_pretrain_resume_refuses_a_key_it_cannot_honour_naming_it(override):
    from llmcli.pretrain import check_resume_data

    saved = build_recipe(tiny_recipe())
    meta = {"recipe": saved.to_dict(), "tokenizer": saved.data.tokenizer}
    check_resume_data(saved, meta, Path("run/step-1.safetensors"))  # the same recipe resumes
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"{key} is .* trained with .*; resume with {key}="):
        check_resume_data(build_recipe(tiny_recipe(), [override]), meta,
                          Path("run/step-1.safetensors"))
    with pytest.raises(UserError, match="is a fine-tuning run; resume it with llm finetune"):
        check_resume_data(saved, {**meta, "template": "Q: {instruction}"},
                          Path("run/step-1.safetensors"))
