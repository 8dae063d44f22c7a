"""`llm finetune`: full and LoRA runs on a tiny byte-level model, adapters, merge, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from llmcli.checkpoint import load_model, read_metadata, save_model
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.data.instruct import STOP_TEXTS
from llmcli.data.templates import render_prompt
from llmcli.files import sha256_file
from llmcli.finetune import finetune, merge_adapter, prepare
from llmcli.model.gpt import build_model
from llmcli.recipe import build_recipe

MODEL = {"vocab_size": 257, "context_length": 48, "d_model": 32, "num_blocks": 2,
         "num_heads": 4, "dropout": 0.0}
TEMPLATE = "Q: {instruction}\n{input}\nA: "


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A byte-level base checkpoint, as `llm pretrain` would write it."""
    recipe = build_recipe({"name": "base", "data": {"tokenizer": "bytes"}, "model": MODEL})
    torch.manual_seed(0)
    model = build_model(recipe.model)
    path = tmp_path / "base" / "step-00000010.safetensors"
    save_model(path, model, recipe, tokenizer="bytes", step=10)
    return path


@pytest.fixture
def records(tmp_path: Path) -> Path:
    colours = ["red", "blue", "green", "black", "white", "pink"]
    data = [{"instruction": f"Colour {i}?", "input": "", "output": colours[i % 6]}
            for i in range(40)]
    data[5] = {"instruction": "no output here"}
    path = tmp_path / "records.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_recipe(base: Path, records: Path, *overrides: str, **sections):
    raw = {
        "name": "ft",
        "data": {"source": str(records), "val_fraction": 0.2},
        "finetune": {"init": str(base), "template": TEMPLATE},
        "train": {"batch_size": 4, "max_iters": 6, "lr": 3e-3, "eval_interval": 3,
                  "eval_iters": 2, "log_interval": 1, "checkpoint_interval": 3,
                  "precision": "fp32", "seed": 7},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_recipe(raw, list(overrides))


def test_prepare_takes_the_base_model_and_reports_malformed(base, records, capsys):
    prep = prepare(make_recipe(base, records))
    assert prep.recipe.model.vocab_size == 257 and prep.recipe.data.tokenizer == "bytes"
    assert prep.extra_meta["template"] == TEMPLATE
    assert prep.extra_meta["tokenizer"] == "bytes" and "stop" not in prep.extra_meta
    assert prep.batches.rows("train") + prep.batches.rows("val") == 39
    assert "record 5: has no 'output' field" in capsys.readouterr().err
    assert all(p.requires_grad for p in prep.model.parameters())
    with pytest.raises(UserError, match="record 5"):
        prepare(make_recipe(base, records), strict=True)


def test_conflicting_model_keys_are_refused(base, records):
    with pytest.raises(UserError, match=r"model.d_model: 64 \(override\) conflicts with the "
                       r"base checkpoint's 32"):
        prepare(make_recipe(base, records, "model.d_model=64"))
    with pytest.raises(UserError, match="data.tokenizer"):
        prepare(make_recipe(base, records, "data.tokenizer=cl100k_base"))
    # the same values, or dropout (it shapes no weight), are fine
    prep = prepare(make_recipe(base, records, "model.d_model=32", "model.dropout=0.2"))
    assert prep.recipe.model.dropout == 0.2
    assert prep.model.blocks[0].ffn.dropout.p == 0.2


def test_bad_inputs_are_one_line_errors(base, records, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("plain text", encoding="utf-8")
    with pytest.raises(UserError, match="not instruction records"):
        prepare(make_recipe(base, records, f"data.source={text}"))
    with pytest.raises(UserError, match="finetune.init: no base checkpoint"):
        prepare(make_recipe(base, records, "finetune.init=null"))
    with pytest.raises(UserError, match="finetune.template"):
        prepare(make_recipe(base, records, "finetune.template=no fields"))


def test_full_finetune_learns_and_stores_the_template(base, records, tmp_path):
    run = finetune(make_recipe(base, records, "train.max_iters=30", "train.eval_interval=10"),
                   run_dir=tmp_path / "full", device="cpu")
    evals = run.result.evals
    assert evals[-1]["val"] < evals[0]["val"]  # held-out answers get more likely
    assert not run.lora and run.trainable == run.total
    meta = read_metadata(run.result.checkpoint)
    assert meta["template"] == TEMPLATE and meta["tokenizer"] == "bytes"
    ckpt = run.result.checkpoint
    assert (ckpt.parent / meta["base"]).resolve() == base.resolve() and "lora" not in meta
    assert meta["base_sha256"] == sha256_file(base)
    model, recipe, _, _ = load_model(run.result.checkpoint)
    assert recipe.model.d_model == 32


def test_lora_run_saves_a_small_adapter_that_loads_as_base_plus_adapter(base, records, tmp_path):
    run = finetune(make_recipe(base, records, "lora.rank=4", "lora.alpha=8",
                               "lora.targets=qkv,proj,ffn_in,ffn_out"),
                   run_dir=tmp_path / "lora", device="cpu", merge=True)
    assert run.lora and 0 < run.trainable < run.total / 5
    adapter = run.result.checkpoint
    with safe_open(str(adapter), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".lora_A" in k or ".lora_B" in k for k in keys)
    assert adapter.stat().st_size < base.stat().st_size / 3
    meta = read_metadata(adapter)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.05,
                            "targets": ["qkv", "proj", "ffn_in", "ffn_out"]}
    assert (run.result.checkpoint.parent / meta["base"]).resolve() == base.resolve()
    assert meta["template"] == TEMPLATE

    # loading the adapter = the base with trained adapters merged, which really changed it
    x = torch.tensor([list(render_prompt(TEMPLATE, "Colour 3?").encode())])
    adapted, _, _, _ = load_model(adapter)
    plain, _, _, _ = load_model(base)
    assert not torch.allclose(adapted(x)[0], plain(x)[0], atol=1e-4)

    # --merge wrote a full checkpoint with the same function and no LoRA metadata
    assert run.merged == tmp_path / "lora" / "merged.safetensors"
    merged, merged_recipe, merged_meta, _ = load_model(run.merged)
    assert "lora" not in merged_meta and merged_meta["template"] == TEMPLATE
    assert merged_recipe.lora.rank == 0
    assert torch.allclose(merged(x)[0], adapted(x)[0], atol=1e-5)
    # and merging by hand gives the same file contents
    again = merge_adapter(adapter, tmp_path / "again.safetensors")
    assert torch.equal(load_model(again)[0](x)[0], merged(x)[0])
    # an adapter whose base is gone is a one-line error; the merged file still loads
    base.rename(base.with_suffix(".moved"))
    with pytest.raises(UserError, match="base checkpoint .* is missing"):
        load_model(adapter)
    assert torch.equal(load_model(run.merged)[0](x)[0], merged(x)[0])


def test_lora_resume_is_exact(base, records, tmp_path):
    overrides = ("lora.rank=2", "lora.dropout=0.1")  # dropout: RNG state must resume too
    whole = finetune(make_recipe(base, records, *overrides), run_dir=tmp_path / "a",
                     device="cpu")
    first = finetune(make_recipe(base, records, *overrides, "train.max_iters=3"),
                     run_dir=tmp_path / "b", device="cpu")
    assert first.result.step == 3
    second = finetune(make_recipe(base, records, *overrides), run_dir=tmp_path / "b",
                      device="cpu", resume=True)
    assert second.result.step == 6
    for step in (4, 5, 6):
        assert second.result.losses[step] == whole.result.losses[step]
    with safe_open(str(whole.result.checkpoint), framework="pt") as a, \
            safe_open(str(second.result.checkpoint), framework="pt") as b:
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    # a fresh run into a directory that holds a run is refused, not mixed in
    with pytest.raises(UserError, match="--resume"):
        finetune(make_recipe(base, records, *overrides), run_dir=tmp_path / "b", device="cpu")


@pytest.mark.parametrize("lora", ["lora.rank=0", "lora.rank=2"])
def test_dropout_near_one_fine_tunes(base, records, tmp_path, lora):
    """model.dropout and lora.dropout take all of [0, 1): 0.99999 once divided by zero."""
    run = finetune(make_recipe(base, records, lora, "model.dropout=0.99999",
                               "lora.dropout=0.99999", "train.max_iters=2"),
                   run_dir=tmp_path / "run", device="cpu")
    assert run.result.step == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in run.result.losses.values())


def test_the_largest_documented_seed_fine_tunes(base, records, tmp_path):
    run = finetune(make_recipe(base, records, f"train.seed={2**63 - 1}", "lora.rank=2",
                               "lora.dropout=0.1", "train.max_iters=2"),
                   run_dir=tmp_path / "run", device="cpu")
    assert run.result.step == 2


def test_a_base_whose_loss_is_not_finite_is_named_before_any_training(base, records,
                                                                      tmp_path):
    """Finite weights so large that the logits overflow even fp32: the base is the cause."""
    model, recipe, meta, _ = load_model(base)
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)  # finite, below fp32's largest; its sums are not
    huge = tmp_path / "huge" / "step-00000010.safetensors"
    save_model(huge, model, recipe, tokenizer="bytes", step=10)
    with pytest.raises(UserError) as info:
        finetune(make_recipe(huge, records, "lora.rank=2"), run_dir=tmp_path / "run",
                 device="cpu")
    message = str(info.value)
    assert "before any training" in message and f"the base checkpoint {huge}" in message
    assert "fp16" not in message and "init_std" not in message and "train.lr" not in message


def test_a_warmup_as_long_as_the_run_is_warned(base, records, tmp_path, capsys):
    finetune(make_recipe(base, records, "lora.rank=2", "train.max_iters=2",
                         "train.warmup_iters=50", "train.lr_schedule=cosine"),
             run_dir=tmp_path / "run", device="cpu")
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "train.warmup_iters" in line]
    assert len(warnings) == 1 and "is not below the run's 2 steps" in warnings[0]


def test_vocabulary_without_end_of_text_ends_answers_with_stop_text(tmp_path, records):
    recipe = build_recipe({"name": "small", "data": {"tokenizer": "bytes"},
                           "model": {**MODEL, "vocab_size": 256}})
    path = tmp_path / "small.safetensors"
    save_model(path, build_model(recipe.model), recipe, tokenizer="bytes")
    prep = prepare(make_recipe(path, records))
    assert prep.extra_meta["stop"] == [STOP_TEXTS[0]]
    x, y = prep.batches.get_batch("train")
    answer_and_stop = y[0][y[0] >= 0].tolist()
    assert bytes(answer_and_stop).decode().endswith(STOP_TEXTS[0])


def test_every_record_error_names_its_file(base, records, tmp_path):
    """`--strict` said "record 0: has no 'instruction' field" without the file it was in."""
    import re

    with pytest.raises(UserError, match=rf"^{re.escape(str(records))}: record 5: has no "
                       "'output' field"):
        prepare(make_recipe(base, records), strict=True)
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "x" * 60, "output": "y"}] * 3), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(long))}: record 0: its prompt alone"):
        prepare(make_recipe(base, long), strict=True)
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(one))}: only 1 usable record"):
        prepare(make_recipe(base, one))


def test_cli_runs_lora_and_merges(base, records, tmp_path):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(
        "data:\n"
        f"  source: {records}\n"
        "finetune:\n"
        f"  init: {base}\n"
        "  template: \"Q: {instruction}\\nA: \"\n"
        "lora:\n  rank: 2\n"
        "train:\n  batch_size: 2\n  max_iters: 2\n  eval_interval: 1\n  eval_iters: 1\n",
        encoding="utf-8")
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(recipe), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "fine-tuned to step 2" in result.stdout
    assert "adapter:" in result.stdout
    adapter = out / "step-00000002.safetensors"
    assert adapter.exists() and "lora" in read_metadata(adapter)

    result = runner.invoke(app, ["finetune", "--merge", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "merged.safetensors").exists()
    again = runner.invoke(app, ["finetune", "--merge", str(out)])  # an earlier merge: replaced
    assert again.exit_code == 0, again.output
    # never over other weights: the base's step file stays as it was
    before = base.read_bytes()
    result = runner.invoke(app, ["finetune", "--merge", str(out), "-o", str(base)])
    assert result.exit_code == 2 and "is not an earlier merge" in result.stderr
    assert base.read_bytes() == before
    folder = tmp_path / "merges"  # an existing folder: merged.safetensors goes in it
    folder.mkdir()
    result = runner.invoke(app, ["finetune", "--merge", str(out), "-o", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "merged.safetensors").exists()

    # --strict turns the malformed record into a one-line error with its index, exit 2
    result = runner.invoke(app, ["finetune", str(recipe), "--strict", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "record 5: has no 'output' field" in result.output
    assert "Traceback" not in result.output
    # merging a full checkpoint is refused in one line
    result = runner.invoke(app, ["finetune", "--merge", str(base)])
    assert result.exit_code == 2 and "not a LoRA adapter" in result.output


def test_a_merge_replaces_only_a_merge_of_its_own_run(base, records, tmp_path, monkeypatch):
    """`--merge runs/A -o runs/B` silently replaced B's own merge with A's: any earlier merge
    counted. Now only a merge of the same run's adapters (another step) is replaced."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run, seed in ((a, "train.seed=7"), (b, "train.seed=8")):
        finetune(make_recipe(base, records, "lora.rank=2", "train.max_iters=3", seed),
                 run_dir=run, device="cpu")
    own = merge_adapter(b)
    before = own.read_bytes()
    for target in (b, own):
        with pytest.raises(UserError, match=rf"-o {own}: is the merge of "
                           rf"{b / 'step-00000003.safetensors'}, another run's adapter; .*"
                           "give -o another file") as caught:
            merge_adapter(a, target)
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert own.read_bytes() == before
    assert merge_adapter(b / "step-00000003.safetensors", own) == own  # its own run: replaced
    monkeypatch.chdir(a)  # recorded beside the merge, so read from any folder
    assert merge_adapter(b, own) == own


@pytest.mark.parametrize("override", ["train.seed=8", "data.val_fraction=0.5",
                                      "data.records=0:30", "finetune.packing=true",
                                      "finetune.template=alpaca"])
def test_resume_refuses_a_key_it_cannot_honour_naming_it(base, records, tmp_path, override):
    finetune(make_recipe(base, records, "lora.rank=2", "train.max_iters=3"),
             run_dir=tmp_path / "b", device="cpu")
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"{key} is .* trained with") as caught:
        finetune(make_recipe(base, records, "lora.rank=2", override), run_dir=tmp_path / "b",
                 device="cpu", resume=True)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize("lora", ["lora.rank=0", "lora.rank=2"])
def test_resume_keeps_its_base_and_refuses_another(base, records, tmp_path, lora):
    """A LoRA resume once kept its own base whatever finetune.init said, silently; a full one
    recorded the new base. The base's file or run directory still name it (it may have newer
    steps), and a full resume needs no finetune.init at all."""
    finetune(make_recipe(base, records, lora, "train.max_iters=3"), run_dir=tmp_path / "b",
             device="cpu")
    other = tmp_path / "other" / "step-00000010.safetensors"
    recipe = build_recipe({"name": "base", "data": {"tokenizer": "bytes"}, "model": MODEL})
    torch.manual_seed(1)  # the same shape, other weights: another base
    save_model(other, build_model(recipe.model), recipe, tokenizer="bytes", step=10)
    with pytest.raises(UserError, match=r"finetune.init: .*other.* is not the base .* "
                       r"fine-tuned from \(.*base/step-00000010.safetensors\)") as caught:
        finetune(make_recipe(base, records, lora, f"finetune.init={other}"),
                 run_dir=tmp_path / "b", device="cpu", resume=True)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    newer = base.parent / "step-00000020.safetensors"
    newer.write_bytes(other.read_bytes())
    run = finetune(make_recipe(base, records, lora, "train.max_iters=4",
                               f"finetune.init={base.parent}"),
                   run_dir=tmp_path / "b", device="cpu", resume=True)
    assert run.base.resolve() == base.resolve() and run.result.step == 4
    assert read_metadata(run.result.checkpoint)["base"].endswith("base/step-00000010.safetensors")
    if lora == "lora.rank=0":
        run = finetune(make_recipe(base, records, lora, "train.max_iters=5", "finetune.init="),
                       run_dir=tmp_path / "b", device="cpu", resume=True)
        assert run.base.resolve() == base.resolve() and run.result.step == 5


def test_a_full_fine_tune_resumes_after_its_base_moved_or_went(base, records, tmp_path, capsys):
    """A full fine-tune holds every weight, yet its resume loaded the base: once the base moved,
    the old path was "not found" and the new one "not the base"; a LoRA resume still needs
    its base, said in one line, and finds it at its new place by its bytes."""
    for lora in ("lora.rank=0", "lora.rank=2"):
        run = tmp_path / lora
        finetune(make_recipe(base, records, lora, "train.max_iters=3"), run_dir=run,
                 device="cpu")
        digest = read_metadata(run / "step-00000003.safetensors")["base_sha256"]
        moved = tmp_path / "moved"
        base.parent.rename(moved)
        try:
            if lora == "lora.rank=2":
                with pytest.raises(UserError, match="base checkpoint .* is missing") as caught:
                    finetune(make_recipe(base, records, lora, "train.max_iters=4"),
                             run_dir=run, device="cpu", resume=True)
                assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
            else:  # the old path, gone: nothing to load, the recorded base kept
                old = finetune(make_recipe(base, records, lora, "train.max_iters=4"),
                               run_dir=run, device="cpu", resume=True)
                assert old.result.step == 4 and old.base.resolve() == base.resolve()
                said = " ".join(capsys.readouterr().err.split())
                assert "from its own checkpoint (its base " in said and "is gone)" in said
                meta = read_metadata(old.result.checkpoint)
                assert meta["base"].endswith("base/step-00000010.safetensors")
                assert meta["base_sha256"] == digest
            for init in (moved, moved / base.name):  # its new place: the same bytes
                steps = 5 if init == moved else 6
                again = finetune(make_recipe(init, records, lora, f"train.max_iters={steps}"),
                                 run_dir=run, device="cpu", resume=True)
                assert again.result.step == steps and again.base.resolve() == moved / base.name
                meta = read_metadata(again.result.checkpoint)
                assert meta["base"].endswith("moved/step-00000010.safetensors")
                assert meta["base_sha256"] == digest
            with pytest.raises(UserError, match=r"finetune.init: .* is not the base .* "
                               "neither that path nor the same bytes") as caught:
                finetune(make_recipe(run, records, lora, "train.max_iters=7"), run_dir=run,
                         device="cpu", resume=True)
            assert caught.value.exit_code == 2
        finally:
            moved.rename(base.parent)


def test_a_resume_keeps_the_step_it_started_from_when_its_run_went_on(base, records, tmp_path):
    """finetune.init=RUN_DIR whose run went on (newer steps, the first one pruned): a full
    resume logged and recorded the newest step as its base, though it started from another."""
    run = tmp_path / "ft"
    finetune(make_recipe(base.parent, records, "train.max_iters=3"), run_dir=run, device="cpu")
    recipe = build_recipe({"name": "base", "data": {"tokenizer": "bytes"}, "model": MODEL})
    newer = base.parent / "step-00000020.safetensors"
    save_model(newer, build_model(recipe.model), recipe, tokenizer="bytes", step=20)
    base.unlink()  # pruned by train.keep_last
    again = finetune(make_recipe(base.parent, records, "train.max_iters=4"), run_dir=run,
                     device="cpu", resume=True)
    assert again.base.name == base.name and again.result.step == 4
    assert read_metadata(again.result.checkpoint)["base"].endswith(base.name)


def test_resume_on_other_records_is_told(base, records, tmp_path, capsys):
    finetune(make_recipe(base, records, "train.max_iters=3"), run_dir=tmp_path / "b",
             device="cpu")
    data = json.loads(records.read_text())
    same_count = tmp_path / "reversed.json"
    same_count.write_text(json.dumps(data[::-1]))
    capsys.readouterr()
    finetune(make_recipe(base, same_count, "train.max_iters=4"), run_dir=tmp_path / "b",
             device="cpu", resume=True)
    assert "the records are not the ones" in capsys.readouterr().err
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(data[:-4]))
    with pytest.raises(UserError, match="--resume .*split has .* rows") as caught:
        finetune(make_recipe(base, fewer), run_dir=tmp_path / "b", device="cpu", resume=True)
    assert caught.value.exit_code == 2


def test_resuming_a_pretraining_run_is_refused(base, records, tmp_path):
    from llmcli.data.batches import TokenWindows
    from llmcli.train.loop import train

    recipe = build_recipe({"name": "base", "data": {"tokenizer": "bytes"}, "model": MODEL,
                           "train": {"max_iters": 2, "batch_size": 2, "eval_iters": 1}})
    tokens = torch.randint(0, 256, (2000,)).numpy()
    train(recipe, build_model(recipe.model), TokenWindows(tokens, 1800, 2, 48),
          tmp_path / "pre", device="cpu", extra_meta={"tokenizer": "bytes"})
    with pytest.raises(UserError, match="is a pretraining run; resume it with") as caught:
        finetune(make_recipe(base, records), run_dir=tmp_path / "pre", device="cpu",
                 resume=True)
    assert caught.value.exit_code == 2
