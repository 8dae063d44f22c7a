"""`llm params`: recipes and checkpoints, the breakdown, JSON, the no-argument default."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcli.checkpoint import save_model
from llmcli.cli import app
from llmcli.model.gpt import GPT
from llmcli.params import count_target
from llmcli.recipe import build_recipe

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def parts_total(report: dict) -> int:
    return sum(part["total"] for part in report["parts"])


def test_scifi_recipe_prints_140_573_600():
    result = runner.invoke(app, ["params", str(ROOT / "recipes" / "scifi.yaml")])
    assert result.exit_code == 0, result.output
    assert "140,573,600" in result.output
    assert "× 12" in result.output


def test_breakdown_adds_up_and_json_is_complete():
    result = runner.invoke(app, ["params", str(ROOT / "recipes" / "scifi.yaml"), "--json"])
    report = json.loads(result.stdout)
    assert report["total"] == 140_573_600 == parts_total(report)
    names = [part["name"] for part in report["parts"]]
    assert names[0] == "token embedding" and names[-1] == "output layer"
    block = next(p for p in report["parts"] if p["repeat"] == 12)
    assert sum(c["params"] for c in block["children"]) == block["params"] == 3_150_848
    fp32 = report["memory_bytes"]["fp32"]
    assert fp32 == {"weights": 4 * 140_573_600, "gradients": 4 * 140_573_600,
                    "adamw": 8 * 140_573_600}
    # 6N over the matmul weights (everything but the embedding and the biases) + 12·L·d·T
    matmul = 12 * (3 * 512 * 512 + 512 * 512 + 2 * 512 * 2048) + 512 * 100256
    assert report["flops_per_token"] == 6 * matmul + 12 * 12 * 512 * 128
    assert report["flops_n"] == matmul  # the N of 6N, printed beside it: not the total
    text = runner.invoke(app, ["params", str(ROOT / "recipes" / "scifi.yaml")]).stdout
    assert f"N = {matmul:,} weights in matrix products" in " ".join(text.split())


def test_training_memory_is_what_llm_trains_in_bf16_too():
    """A "bf16" row showed 2-byte weights and gradients (1.6 GiB for scifi) beside a per-device
    table of 2.1 GiB: llm's bf16 is autocast over fp32 weights, gradients and moments."""
    scifi = str(ROOT / "recipes" / "scifi.yaml")
    report = json.loads(runner.invoke(app, ["params", scifi, "train.precision=bf16", "--nproc",
                                            "1", "--json"]).stdout)
    assert list(report["memory_bytes"]) == ["fp32"]
    ddp = report["device_memory"]["ddp"]
    assert sum(report["memory_bytes"]["fp32"].values()) == ddp["total"] == 16 * 140_573_600
    text = " ".join(runner.invoke(app, ["params", scifi]).stdout.split())
    assert "268.1 MiB" not in text and "fp32 (any train.precision)" in text
    assert "bf16 and fp16 autocast the compute" in text


def test_overrides_and_auto_vocab_note():
    report = count_target(ROOT / "recipes" / "scifi.yaml", ["model.num_blocks=24"])
    assert report["total"] == 140_573_600 + 12 * 3_150_848
    sales = count_target(ROOT / "recipes" / "sales.yaml")
    assert sales["notes"] and "auto" in sales["notes"][0]
    assert sales["total"] == parts_total(sales)


def test_billion_parameter_recipe_is_counted_on_meta(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model:\n  d_model: 4096\n  num_heads: 32\n  num_blocks: 32\n"
                    "  context_length: 4096\n", encoding="utf-8")
    report = count_target(path)
    assert report["total"] > 6_000_000_000


def test_checkpoint_counts_the_stored_tensors(tmp_path, tiny_model_cfg):
    recipe = build_recipe({"model": {"vocab_size": 64, "context_length": 16, "d_model": 32,
                                     "num_blocks": 2, "num_heads": 4, "tie_embeddings": True}})
    model = GPT(recipe.model)
    run = tmp_path / "run"
    save_model(run / "step-00000005.safetensors", model, recipe, step=5, tokenizer="bytes")
    expected = sum(p.numel() for p in model.parameters())  # tied weight once
    recipe_file = tmp_path / "tied.yaml"
    recipe_file.write_text(json.dumps({"model": dataclasses.asdict(recipe.model)}),
                           encoding="utf-8")
    from_recipe = count_target(recipe_file)
    for target in (run, run / "step-00000005.safetensors"):
        report = count_target(target)
        assert report["kind"] == "checkpoint"
        assert report["total"] == expected == parts_total(report)
        # the shared tensor is stored as lm_head.weight; it is the embedding, as a recipe says
        assert report["parts"] == from_recipe["parts"]
        assert report["parts"][0]["total"] == 64 * 32


def test_no_argument_uses_newest_run_else_scifi(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "scifi.yaml").write_text(
        (ROOT / "recipes" / "scifi.yaml").read_text(), encoding="utf-8")
    result = runner.invoke(app, ["params", "--json"])
    assert json.loads(result.stdout)["total"] == 140_573_600
    assert "recipes/scifi.yaml" in result.stderr
    recipe = build_recipe({"model": {"vocab_size": 10, "context_length": 8, "d_model": 16,
                                     "num_blocks": 1, "num_heads": 2}})
    save_model(tmp_path / "checkpoints" / "small" / "step-00000001.safetensors",
               GPT(recipe.model), recipe, step=1)
    result = runner.invoke(app, ["params", "--json"])
    assert json.loads(result.stdout)["kind"] == "checkpoint"
    assert "checkpoints/small" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["params", "nope.yaml"], "recipe file not found"),
    (["params", "missing.safetensors"], "checkpoint not found"),
])
def test_bad_targets(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    result = runner.invoke(app, ["params", str(path)])
    assert result.exit_code == 2 and "not an llm checkpoint" in result.output


def test_gpt2_recipe_counts_as_transformers_does():
    assert count_target(ROOT / "recipes" / "gpt2.yaml")["total"] == 124_439_808


@pytest.mark.parametrize("vocab", ["full", "compact"])
def test_auto_vocabulary_of_a_tokenized_corpus_is_the_one_training_uses(
        tmp_path, monkeypatch, vocab):
    """With the corpus tokenized, `auto` counts as pretraining resolves it, not the full
    tokenizer: the largest id + 1, or the training part's distinct ids + 1 (compact)."""
    from llmcli.data.tokenize import tokenize_files
    from llmcli.pretrain import load_corpus
    from llmcli.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    text = "".join(chr(33 + i % 90) * 3 + " " for i in range(2000)) + "\u00c8 tail"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    tokenize_files([tmp_path / "c.txt"], tmp_path / "data" / "c.tokens", "bytes", 0.1)
    (tmp_path / "r.yaml").write_text(
        "data:\n  source: c.txt\n  tokenizer: bytes\n  vocab: " + vocab + "\n"
        "model:\n  vocab_size: auto\n  context_length: 8\n  d_model: 16\n  num_blocks: 1\n"
        "  num_heads: 2\n", encoding="utf-8")
    recipe = load_recipe(tmp_path / "r.yaml")
    trained, _ = load_corpus(recipe, data_dir=tmp_path / "data")
    report = count_target(tmp_path / "r.yaml")
    counted = build_recipe({"model": {**trained.model.__dict__}})
    assert report["total"] == sum(p.numel() for p in GPT(counted.model).parameters())
    assert "data/c.tokens" in report["notes"][0]
    assert ("training part" in report["notes"][0]) == (vocab == "compact")


def test_lora_adapter_counts_base_plus_adapter(tmp_path):
    from llmcli.checkpoint import base_reference, save_adapter
    from llmcli.model.lora import apply_lora, lora_meta

    recipe = build_recipe({"data": {"tokenizer": "bytes"},
                           "model": {"vocab_size": 64, "context_length": 16, "d_model": 32,
                                     "num_blocks": 2, "num_heads": 4},
                           "lora": {"rank": 4, "targets": ["qkv", "head"]}})
    model = GPT(recipe.model)
    base = tmp_path / "base" / "step-00000001.safetensors"
    save_model(base, model, recipe, tokenizer="bytes")
    base_total = sum(p.numel() for p in model.parameters())
    apply_lora(model, recipe.lora)
    adapter_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    run = tmp_path / "lora"
    save_adapter(run / "step-00000002.safetensors", model, recipe, tokenizer="bytes",
                 lora=lora_meta(recipe.lora), **base_reference(run, base))
    report = count_target(run)
    assert report["total"] == base_total + adapter_total == parts_total(report)
    assert report["trainable"] == adapter_total
    assert report["flops_per_token"] == count_target(base)["flops_per_token"]
    assert "LoRA adapter" in report["notes"][0]


# ---------------------------------------------------------------------------------------------
# Fine-tuning recipes count what fine-tuning trains: the base's model, the LoRA adapter

BASE_MODEL = {"vocab_size": 64, "context_length": 16, "d_model": 32, "num_blocks": 2,
              "num_heads": 4}
ALL_TARGETS = ["qkv", "proj", "ffn_in", "ffn_out", "head"]


def write_base(tmp_path: Path, activation: str = "relu") -> int:
    """A tiny base run in tmp_path/checkpoints/base; returns its parameter count."""
    recipe = build_recipe({"data": {"tokenizer": "bytes"},
                           "model": {**BASE_MODEL, "activation": activation}})
    model = GPT(recipe.model)
    save_model(tmp_path / "checkpoints" / "base" / "step-00000001.safetensors", model, recipe,
               step=1, tokenizer="bytes")
    return sum(p.numel() for p in model.parameters())


def write_finetune(tmp_path: Path, init: str = "checkpoints/base", rank: int = 0) -> Path:
    """A fine-tuning recipe without a model section (the default one is 140M parameters)."""
    path = tmp_path / "ft.yaml"
    path.write_text(f"finetune:\n  init: {init}\nlora:\n  rank: {rank}\n  targets: "
                    f"[{', '.join(ALL_TARGETS)}]\n", encoding="utf-8")
    return path


def adapter_size(rank: int, activation: str = "relu") -> int:
    """The adapter `llm finetune` trains on the base: apply_lora on a real model."""
    from llmcli.model.lora import apply_lora

    recipe = build_recipe({"model": {**BASE_MODEL, "activation": activation},
                           "lora": {"rank": rank, "targets": ALL_TARGETS}})
    model = GPT(recipe.model)
    apply_lora(model, recipe.lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_finetune_recipe_counts_its_base_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_total = write_base(tmp_path)
    report = count_target(write_finetune(tmp_path))
    assert report["total"] == report["trainable"] == base_total == parts_total(report)
    assert report["context_length"] == 16  # the base's, not the default section's 128
    assert "base checkpoint checkpoints/base/step-00000001.safetensors" in report["notes"][0]


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_lora_finetune_recipe_trains_only_the_adapter(tmp_path, monkeypatch, activation):
    monkeypatch.chdir(tmp_path)
    base_total = write_base(tmp_path, activation)
    adapter = adapter_size(4, activation)
    result = runner.invoke(app, ["params", str(write_finetune(tmp_path, rank=4)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trainable"] == adapter
    assert report["total"] == base_total + adapter == parts_total(report)
    assert report["parts"][-1]["name"].startswith("LoRA adapter (rank 4: qkv, proj")
    assert report["memory_bytes"]["fp32"]["gradients"] == 4 * adapter
    assert any("only the adapter's" in note for note in report["notes"])


def test_lora_count_matches_the_real_tiny_lora_finetune():
    """`llm finetune recipes/tiny-lora.yaml` on a tiny base of 16,945 ids reported "training
    210,312 of 5,401,352 parameters"."""
    from llmcli.params import lora_parameters
    from llmcli.recipe import load_recipe

    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml", ["model.vocab_size=16945"])
    lora = load_recipe(ROOT / "recipes" / "tiny-lora.yaml").lora
    assert lora_parameters(dataclasses.replace(tiny, lora=lora)) == 210_312
    assert count_target(ROOT / "recipes" / "tiny.yaml", ["model.vocab_size=16945"]
                        )["total"] == 5_401_352 - 210_312


def test_lora_override_on_a_plain_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in BASE_MODEL.items()),
                    encoding="utf-8")
    full = count_target(path)
    lora = count_target(path, ["lora.rank=8", f"lora.targets=[{','.join(ALL_TARGETS)}]"])
    assert full["trainable"] == full["total"]
    assert lora["trainable"] == adapter_size(8) == lora["total"] - full["total"]


def test_lora_on_a_tied_output_layer_is_one_line_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in BASE_MODEL.items())
                    + "  tie_embeddings: true\nlora:\n  rank: 4\n  targets: [head]\n",
                    encoding="utf-8")
    result = runner.invoke(app, ["params", str(path)])
    assert result.exit_code == 2 and "lora:" in result.stderr and "tied" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_finetune_recipe_with_missing_base_counts_its_own_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_finetune(tmp_path, init="checkpoints/nowhere")
    path.write_text(path.read_text() + "model:\n" + "".join(
        f"  {k}: {v}\n" for k, v in BASE_MODEL.items()), encoding="utf-8")
    report = count_target(path)
    assert report["total"] == report["trainable"]
    assert report["total"] == sum(p.numel() for p in GPT(build_recipe(
        {"model": BASE_MODEL}).model).parameters())
    assert "not found" in report["notes"][0] and "recipe's own model section" in report["notes"][0]


@pytest.mark.parametrize("size", ["0.5", "0.4B", "0.000000000001GB", "0B"])
def test_device_memory_below_one_byte_is_refused(size):
    result = runner.invoke(app, ["params", str(ROOT / "recipes" / "tiny.yaml"),
                                 "--device-memory", size])
    assert result.exit_code == 2 and "less than 1 byte" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_device_memory_without_a_unit_is_refused():
    """`--device-memory 80` was 80 bytes: "2.1 GiB of 80 B per device (does not fit)"."""
    result = runner.invoke(app, ["params", str(ROOT / "recipes" / "tiny.yaml"),
                                 "--device-memory", "80"])
    assert result.exit_code == 2 and "needs a unit" in result.stderr
    assert "80GB" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_device_memory_of_zero_is_not_the_default():
    from llmcli.params import memory_per_device
    from llmcli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "scifi.yaml")
    assert memory_per_device(recipe, {}, 10, 10, 1, 0)["device_bytes"] == 0
