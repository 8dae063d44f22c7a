"""Checkpoints and run directories: no run loses another's work, no file is trusted blindly."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
import yaml
from helpers_train import MINI_RECIPE, make_project, markov_tokens, one_thread, write_tokens
from typer.testing import CliRunner

from llmcli.checkpoint import (
    Checkpoint,
    read_metadata,
    resolve_checkpoint,
    save_adapter,
    save_model,
    step_checkpoints,
    trainer_path,
)
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.model.gpt import build_model
from llmcli.model.lora import apply_lora
from llmcli.recipe import build_recipe

_threads = pytest.fixture(autouse=True)(one_thread)
runner = CliRunner()

MODEL = {"vocab_size": 48, "context_length": 16, "d_model": 32, "num_blocks": 2, "num_heads": 4,
         "dropout": 0.0}


@pytest.fixture
def project(tmp_path, monkeypatch):
    return make_project(tmp_path, monkeypatch)


def llm(*args: str):
    return runner.invoke(app, list(args))


def pretrain(*extra: str):
    return llm("pretrain", "mini.yaml", "data.source=corpus.tokens", *extra)


def snapshot(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The run directory guard


def test_a_second_run_without_resume_is_refused_and_touches_nothing(project):
    assert pretrain().exit_code == 0
    run = project / "checkpoints" / "mini"
    before = snapshot(run)
    again = pretrain("train.max_iters=3")
    assert again.exit_code == 2
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert snapshot(run) == before


def test_overwrite_starts_afresh_and_resume_then_continues_the_new_run(project):
    assert pretrain("train.max_iters=9").exit_code == 0
    run = project / "checkpoints" / "mini"
    fresh = pretrain("train.max_iters=3", "--overwrite")
    assert fresh.exit_code == 0, fresh.output
    # the old run's step 6 and 9 are gone: a later --resume cannot pick them
    assert [s for s, _ in step_checkpoints(run)] == [3]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics) == 3
    more = pretrain("train.max_iters=6", "--resume")
    assert more.exit_code == 0, more.output
    assert [s for s, _ in step_checkpoints(run)] == [3, 6]


def test_finetune_refuses_an_earlier_run_too_and_names_overwrite(project, tmp_path):
    from llmcli.checkpoint import prepare_run_dir

    run = tmp_path / "ft"
    run.mkdir()
    (run / "step-00000002.safetensors").write_bytes(b"old")
    with pytest.raises(UserError) as info:
        prepare_run_dir(run, resuming=False, overwrite=False)
    assert "--overwrite" in str(info.value) and "--resume" in str(info.value)
    prepare_run_dir(run, resuming=False, overwrite=True)
    assert not list(run.iterdir())


def test_run_dir_that_is_a_file_is_a_one_line_error(project):
    (project / "taken").write_text("x")
    result = pretrain("-o", "taken")
    assert result.exit_code == 2 and "not a directory" in result.stderr


@pytest.mark.parametrize("name", ["../escape", "/abs/run", "a/b", "..", ""])
def test_recipe_name_must_be_one_path_component(project, name):
    recipe = dict(MINI_RECIPE, name=name)
    (project / "bad.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = llm("pretrain", "bad.yaml", "data.source=corpus.tokens")
    assert result.exit_code == 2 and "name" in result.stderr
    assert not (project / "checkpoints").exists()
    assert not (project.parent / "escape").exists()


def test_stale_temporary_files_are_swept_on_start_and_resume(project):
    run = project / "checkpoints" / "mini"
    run.mkdir(parents=True)
    stale = run / ".step-00000003.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    keep = run / "notes.txt"
    keep.write_text("mine")
    result = pretrain()
    assert result.exit_code == 0, result.output
    assert not stale.exists() and keep.read_text() == "mine"
    assert "temporary" in result.stderr
    stale.write_bytes(b"again")
    assert pretrain("train.max_iters=9", "--resume").exit_code == 0
    assert not stale.exists()


def test_every_file_a_run_writes_has_the_same_mode(project):
    assert pretrain().exit_code == 0
    run = project / "checkpoints" / "mini"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_damaged_newest_checkpoint_is_named_and_the_good_one_offered(project):
    assert pretrain().exit_code == 0
    run = project / "checkpoints" / "mini"
    newest = run / "step-00000006.safetensors"
    truncate(newest)
    gen = llm("generate", str(run), "ab", "--max-new-tokens", "2")
    assert gen.exit_code == 2
    assert "step-00000006.safetensors" in gen.stderr and "step-00000003" in gen.stderr
    resume = pretrain("train.max_iters=9", "--resume")
    assert resume.exit_code == 2
    assert "step-00000006" in resume.stderr and "--resume auto" in resume.stderr


def test_resume_auto_takes_the_newest_intact_checkpoint(project):
    assert pretrain().exit_code == 0
    run = project / "checkpoints" / "mini"
    truncate(trainer_path(run / "step-00000006.safetensors"), keep=0.3)
    result = pretrain("train.max_iters=9", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr and "step-00000003" in result.stderr
    assert read_metadata(run / "step-00000009.safetensors")["step"] == 9


def write_checkpoint(path, *, meta_patch=None, tensors_patch=None, **meta):
    recipe = build_recipe({"data": {"tokenizer": "bytes"}, "model": MODEL})
    torch.manual_seed(0)
    model = build_model(recipe.model)
    if tensors_patch:
        tensors_patch(model)
    save_model(path, model, recipe, tokenizer="bytes", **meta)
    if meta_patch:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        raw = read_raw_meta(path)
        meta_patch(raw)
        save_file(tensors, str(path), metadata=raw)
    return path


def read_raw_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


@pytest.mark.skipif(os.name != "posix", reason="a folder name in bytes that are not UTF-8")
def test_a_folder_named_in_another_encoding_holds_runs_and_token_files(tmp_path):
    """Under a folder named b'u\\xff' a checkpoint was called damaged ('Path ... is not valid
    UTF-8': safetensors' words), and a token file was left without its sidecar."""
    from llmcli.data.tokenize import read_sidecar, tokenize_files

    folder = tmp_path / os.fsdecode(b"u\xff")
    folder.mkdir()
    path = write_checkpoint(folder / "step-00000001.safetensors", step=1)
    assert Checkpoint.open(folder).load() is not None
    (folder / "a.txt").write_text("hello world", encoding="utf-8")
    tokenize_files([folder / "a.txt"], folder / "a.tokens", tokenizer="bytes")
    assert read_sidecar(folder / "a.tokens")["sources"][0]["path"] == str(folder / "a.txt")
    assert path.is_file()


def test_weights_with_nan_are_refused_at_load(tmp_path):
    def poison(model):
        with torch.no_grad():
            model.blocks[1].ffn.fc_in.weight[0, 0] = float("nan")

    path = write_checkpoint(tmp_path / "nan.safetensors", tensors_patch=poison)
    with pytest.raises(UserError) as info:
        Checkpoint.open(path).load()
    assert "NaN or Inf" in str(info.value) and "blocks.1.ffn.fc_in.weight" in str(info.value)


def retype(path, name_part, dtype):
    """Rewrite one tensor of a safetensors file (the first whose name holds `name_part`) with
    another dtype, keeping the metadata: what an altered or foreign file holds."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k in tensors if name_part in k)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(path), metadata=read_raw_meta(path))
    return name


@pytest.mark.parametrize("dtype, shown", [(torch.int64, "I64"), (torch.int32, "I32")])
def test_weights_that_are_not_floats_are_refused_at_load(tmp_path, dtype, shown):
    """An integer tensor loaded silently before: cast to float (an I32 header over float bytes
    gave norms of 1065353216) and the model generated."""
    path = write_checkpoint(tmp_path / "int.safetensors")
    name = retype(path, "norm", dtype)
    result = llm("generate", str(path), "ab", "--max-new-tokens", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {path}: tensor {name} is {shown}; expected a "
                                     "floating-point dtype (F32/BF16/F16); the file was altered "
                                     "or does not hold weights")


def test_adapter_tensors_that_are_not_floats_are_refused_at_load(tmp_path):
    base = write_checkpoint(tmp_path / "base" / "step-00000001.safetensors")
    adapter, _ = adapter_on(tmp_path, base)
    name = retype(adapter, "lora_A", torch.int64)
    with pytest.raises(UserError) as info:
        Checkpoint.open(adapter).load()
    assert f"tensor {name} is I64; expected a floating-point dtype" in str(info.value)


@pytest.mark.parametrize("patch, words", [
    (lambda m: m.pop("recipe"), "no recipe"),
    (lambda m: m.__setitem__("recipe", "[1, 2]"), "no recipe"),
    (lambda m: m.__setitem__("vocab_map", '"abc"'), "vocab_map"),
    (lambda m: m.__setitem__("vocab_map", json.dumps(list(range(10)))), "vocab_map"),
    (lambda m: m.__setitem__("vocab_map", json.dumps([5, 3] + list(range(6, 51)))), "vocab_map"),
    (lambda m: m.__setitem__("tokenizer", '"../../etc"'), "tokenizer"),
    (lambda m: m.__setitem__("template", '"no field"'), "template"),
    (lambda m: m.__setitem__("stop", '"x"'), "stop"),
    (lambda m: m.__setitem__("lora", '{"rank": 2}'), "base"),
    # ids the named tokenizer cannot decode (a cl100k map under 'bytes'), and a compact model
    # whose map was removed: generating would fail half-way or print another text
    (lambda m: m.__setitem__("vocab_map", json.dumps(list(range(1000, 1047)))), "beyond the 257"),
    (lambda m: m.__setitem__("recipe", m["recipe"].replace('"vocab": "full"',
                                                           '"vocab": "compact"')), "compact"),
])
def test_crafted_metadata_is_a_one_line_error(tmp_path, patch, words):
    path = write_checkpoint(tmp_path / "x.safetensors", meta_patch=patch)
    result = llm("generate", str(path), "ab", "--max-new-tokens", "1")
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def adapter_on(tmp_path, base):
    recipe = build_recipe({"data": {"tokenizer": "bytes"}, "model": MODEL,
                           "lora": {"rank": 2, "targets": ["qkv"]}})
    model = Checkpoint.open(base).load()
    apply_lora(model, recipe.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    from llmcli.checkpoint import base_reference
    from llmcli.model.lora import lora_meta

    run = tmp_path / "lora"
    path = run / "step-00000001.safetensors"
    save_adapter(path, model, recipe, tokenizer="bytes", lora=lora_meta(recipe.lora),
                 **base_reference(run, base))
    return path, model


def test_adapter_names_its_base_relatively_and_the_pair_moves_together(tmp_path):
    base = write_checkpoint(tmp_path / "base" / "step-00000001.safetensors")
    adapter, model = adapter_on(tmp_path, base)
    meta = read_metadata(adapter)
    assert meta["base"] == "../base/step-00000001.safetensors"
    import shutil

    copy = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, copy)
    shutil.rmtree(tmp_path / "base")  # the original base is gone: only the moved one can serve
    loaded = Checkpoint.open(copy / "lora").load()
    from llmcli.model.lora import merge_lora

    merge_lora(model)
    model.eval()
    x = torch.randint(0, 48, (1, 8))
    assert torch.allclose(loaded(x)[0], model(x)[0], atol=1e-5)


def test_adapter_whose_base_changed_or_vanished_or_is_itself_is_refused(tmp_path):
    base = write_checkpoint(tmp_path / "base" / "step-00000001.safetensors")
    adapter, _ = adapter_on(tmp_path, base)
    write_checkpoint(base, tensors_patch=lambda m: torch.nn.init.zeros_(m.norm.weight))
    with pytest.raises(UserError, match="has changed"):
        Checkpoint.open(adapter).load()
    base.unlink()
    with pytest.raises(UserError, match="missing"):
        Checkpoint.open(adapter).load()

    def self_base(meta):
        meta["base"] = json.dumps(adapter.name)
        meta.pop("base_sha256", None)

    from safetensors.torch import load_file, save_file

    raw = read_raw_meta(adapter)
    self_base(raw)
    save_file(load_file(str(adapter)), str(adapter), metadata=raw)
    with pytest.raises(UserError, match="itself"):
        Checkpoint.open(adapter).load()


def test_adapter_loop_between_two_files_ends_with_an_error(tmp_path):
    base = write_checkpoint(tmp_path / "base" / "step-00000001.safetensors")
    a, _ = adapter_on(tmp_path, base)
    b = tmp_path / "lora" / "step-00000002.safetensors"
    b.write_bytes(a.read_bytes())
    from safetensors.torch import load_file, save_file

    for this, other in ((a, b), (b, a)):
        raw = read_raw_meta(this)
        raw["base"] = json.dumps(other.name)
        raw.pop("base_sha256", None)
        save_file(load_file(str(this)), str(this), metadata=raw)
    with pytest.raises(UserError) as info:
        Checkpoint.open(a).load()
    assert "adapter" in str(info.value)


def test_trainer_state_and_pickles_are_not_model_checkpoints(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickled"):
        resolve_checkpoint(tmp_path / "model.pt")
    (tmp_path / "step-00000001.trainer.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="trainer state"):
        resolve_checkpoint(tmp_path / "step-00000001.trainer.safetensors")


def test_resuming_toward_a_different_end_warns_that_the_schedule_changes(project):
    cosine = ["train.lr_schedule=cosine", "train.warmup_iters=1"]
    assert pretrain(*cosine).exit_code == 0
    result = pretrain(*cosine, "train.max_iters=9", "--resume")
    assert result.exit_code == 0, result.output
    assert "schedule changes" in result.stderr
    constant = pretrain("train.max_iters=12", "--resume")
    assert "schedule changes" not in constant.stderr


# ---------------------------------------------------------------------------------------------
# Resuming on other data, and inputs that are not what they say (found by an adversarial sweep)


def test_resume_refuses_another_tokenizer_or_vocabulary_and_tells_of_another_corpus(project):
    assert pretrain().exit_code == 0
    other = pretrain("--resume", "train.max_iters=9", "data.tokenizer=cl100k_base")
    assert other.exit_code == 2 and "trained with the bytes tokenizer" in other.stderr
    compact = pretrain("--resume", "train.max_iters=9", "data.vocab=compact")
    assert compact.exit_code == 2 and "trained on a full vocabulary" in compact.stderr
    write_tokens(project / "corpus.tokens", markov_tokens(5000, seed=3))
    moved = pretrain("--resume", "train.max_iters=9")
    assert moved.exit_code == 0, moved.output
    assert "the corpus is not the one" in moved.stderr
    again = pretrain("--resume", "train.max_iters=12")  # the same corpus as the last save
    assert again.exit_code == 0 and "the corpus is not" not in again.stderr


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_a_rerun(project,
                                                                                monkeypatch):
    """A failure after the step-0 evaluation left metrics.jsonl and loss.png; the rerun was
    refused as "an earlier run", and --resume found nothing to continue."""
    from llmcli.train.loop import Trainer

    def broken(self, model):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", broken)
        assert pretrain().exit_code == 1
    run = project / "checkpoints" / "mini"
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]
    resumed = pretrain("--resume")  # it offers what works: a plain start, not --overwrite
    assert resumed.exit_code == 2 and "start again without --resume" in resumed.stderr
    again = pretrain()
    assert again.exit_code == 0, again.output
    assert "replacing metrics.jsonl and loss.png of an earlier start" in again.stderr
    assert [s for s, _ in step_checkpoints(run)] == [3, 6]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text()
            .splitlines()][0] == 0


def test_an_earlier_runs_tensorboard_events_are_part_of_it(project):
    """`--overwrite` deleted an earlier run but left its TensorBoard events, which then showed
    as the new run's curves; a folder of them alone is an earlier start, replaced."""
    assert pretrain().exit_code == 0
    run = project / "checkpoints" / "mini"
    events = run / "tensorboard" / "events.out.tfevents.1.host"
    events.parent.mkdir()
    events.write_bytes(b"old run")
    assert pretrain("--overwrite").exit_code == 0
    assert not (run / "tensorboard").exists()
    for path in list(run.iterdir()):
        path.unlink()
    events.parent.mkdir()
    events.write_bytes(b"old run")
    again = pretrain()
    assert again.exit_code == 0, again.output
    assert "replacing tensorboard of an earlier start" in again.stderr
    assert not (run / "tensorboard").exists()


def test_an_earlier_run_without_step_checkpoints_is_not_offered_to_resume(project):
    run = project / "checkpoints" / "mini"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "eval", "step": 3}\n')
    (run / "best.safetensors").write_bytes(b"trained weights")  # worth keeping: refused
    result = pretrain()
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "so there is nothing to --resume; replace it with --overwrite" in result.stderr
    assert "continue it with --resume" not in result.stderr
    assert (run / "best.safetensors").read_bytes() == b"trained weights"


def test_dropout_near_one_trains(project):
    """model.dropout=0.99999 (in range) rounded to a 15-bit threshold of 1 and divided by 0."""
    result = pretrain("train.max_iters=3", "model.dropout=0.99999")
    assert result.exit_code == 0, result.output


def test_an_empty_metrics_file_is_not_a_run(project):
    (project / "checkpoints" / "mini").mkdir(parents=True)
    (project / "checkpoints" / "mini" / "metrics.jsonl").touch()  # a start stopped early
    assert pretrain().exit_code == 0


@pytest.mark.parametrize("setup, words", [
    (lambda p: (p / "corpus.tokens").write_bytes(np.full(4000, 300, "<u4").tobytes()),
     "holds token id 300"),
    (lambda p: (p / "folder.tokens").mkdir(), "a folder without the index.json"),
])
def test_corpus_problems_are_one_line(project, setup, words):
    setup(project)
    source = "folder.tokens" if "folder" in words else "corpus.tokens"
    result = pretrain(f"data.source={source}")
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]  # after the run's description, if it began
    assert last.startswith("error:") and words in last and result.stderr.count("error:") == 1


def test_a_transformers_folder_given_as_a_checkpoint_points_to_llm_import(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    save_file({"wte.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    for call in (lambda: resolve_checkpoint(folder), lambda: read_metadata(
            folder / "model.safetensors")):
        with pytest.raises(UserError, match=r"holds a transformers model: bring it in with "
                           r"`llm import .*hf-model -o checkpoints/NAME`"):
            call()
    (folder / "config.json").unlink()  # a folder that is not a model keeps the plain message
    with pytest.raises(UserError) as plain:
        resolve_checkpoint(folder)
    assert "llm import" not in str(plain.value)
