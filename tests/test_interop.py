"""`llm export` / `llm import`: tiny models through transformers and back, offline.

Every model here is built by the test (llm's or transformers' own classes, a few thousand
parameters); tokenizers are llm's bytes and cl100k_base, and a small BPE trained on the spot.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmcli.checkpoint import Checkpoint, save_model
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.data.tokenizer import get_tokenizer
from llmcli.generate.decode import sample
from llmcli.interop.hf_export import export_hf
from llmcli.interop.hf_import import import_hf
from llmcli.interop.mapping import import_class
from llmcli.model.gpt import build_model
from llmcli.recipe import GenerateConfig, build_recipe

runner = CliRunner()

TINY = {"vocab_size": 257, "context_length": 32, "d_model": 32, "num_blocks": 2,
        "num_heads": 4, "dropout": 0.0}
ARCHS = {
    "gpt2": {"positions": "learned", "activation": "gelu", "qkv_bias": True,
             "output_bias": False, "tie_embeddings": True},
    "gpt2-sinusoidal-relu-no-bias": {"positions": "sinusoidal", "activation": "relu",
                                     "bias": False},
    "llama": {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False,
              "rope_theta": 500.0},
    "llama-biases-tied": {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu",
                          "qkv_bias": True, "output_bias": False, "tie_embeddings": True},
}
TEXTS = ["Hello world!", "  leading   spaces\n\n\ttabs  \n", "naïve café 日本語 🤖 👩‍👩‍👧",
         "def f(x):\n    return x**2  # comment\n", "123456789 1,234.56", "I'll we've DON'T",
         " " * 17 + "x", "\r\n\r\n", "trailing   "]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    from llmcli.interop import tokenizer_store

    monkeypatch.chdir(tmp_path)  # checkpoints/ lives in the test's dir
    monkeypatch.setattr(tokenizer_store, "cache_dir", lambda part: tmp_path / "cache" / part)
    monkeypatch.setattr(tokenizer_store, "_runs", [])


def llm_checkpoint(folder: Path, seed: int = 0, **model) -> Path:
    """A tiny llm checkpoint with the bytes tokenizer and weights far from their init."""
    recipe = build_recipe({"name": folder.name, "data": {"tokenizer": "bytes"},
                           "model": {**TINY, **model}})
    torch.manual_seed(seed)
    net = build_model(recipe.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.15)  # peaked logits: no near-ties in greedy choices
    path = folder / "step-00000001.safetensors"
    save_model(path, net, recipe, tokenizer="bytes", step=1)
    return path


def logits_and_greedy(hf, ours, eos: int | None, new: int = 12) -> None:
    """transformers' logits equal ours to 1e-5 and greedy decoding picks the same tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, int(ours.cfg.vocab_size), (2, ours.cfg.context_length))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids)[0], atol=1e-5, rtol=0)
        prompt = ids[:1, :5]
        theirs = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, 5:].tolist()
    mine = sample(ours, prompt[0].tolist(), GenerateConfig(strategy="greedy", max_new_tokens=new),
                  eos_id=eos)[0].tokens
    assert mine == theirs


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS[arch])
    code, output = invoke("export", str(ckpt.parent), "-o", "out")
    assert code == 0, output
    want = "LlamaForCausalLM" if arch.startswith("llama") else "GPT2LMHeadModel"
    assert f"wrote out ({want}" in output
    assert sorted(p.name for p in Path("out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    hf = AutoModelForCausalLM.from_pretrained("out").eval()
    assert type(hf).__name__ == want
    logits_and_greedy(hf, Checkpoint.open(ckpt).load(), eos=256)
    tok = AutoTokenizer.from_pretrained("out")
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == get_tokenizer("bytes").encode(text)
    assert tok.eos_token_id == 256 and hf.generation_config.eos_token_id == 256


def test_cl100k_exports_as_a_fast_tokenizer_with_tiktokens_ids(tmp_path):
    from transformers import AutoTokenizer

    from llmcli.interop.tokenizer_export import write_native

    cl100k = get_tokenizer("cl100k_base")
    assert write_native(tmp_path / "full", "cl100k_base", 100277, 128) == 100257
    tok = AutoTokenizer.from_pretrained(tmp_path / "full")
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for text in [*TEXTS, "a" * 40, "x  \n  y", "1234567", "don't  stop\n\n\n  now"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == cl100k.encode(text), text
        assert tok.decode(ids) == text
    # transformers reads special-token text as the token; llm (and the seed's model, whose
    # vocabulary of 100,256 has no end-of-text) read it as text
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [100257]
    assert tok.convert_tokens_to_ids("<|endofprompt|>") == 100276
    assert write_native(tmp_path / "seed", "cl100k_base", 100256, 128) is None
    seed = AutoTokenizer.from_pretrained(tmp_path / "seed")
    text = "end<|endoftext|>"
    assert seed.encode(text, add_special_tokens=False) == cl100k.encode(text)


def test_only_an_unaltered_native_tokenizer_is_taken_for_cl100k_or_bytes(tmp_path):
    """cl100k's vocabulary and merges with another pre-tokenizer (or normalizer, added token)
    were taken for cl100k_base, whose ids then differed from transformers'."""
    from llmcli.interop.tokenizer_export import native_name, write_native

    write_native(tmp_path / "cl100k", "cl100k_base", 100258, 128)  # end-of-text only
    assert native_name(tmp_path / "cl100k" / "tokenizer.json") == "cl100k_base"
    write_native(tmp_path / "bytes", "bytes", 257, 128)
    assert native_name(tmp_path / "bytes" / "tokenizer.json") == "bytes"
    for name in ("cl100k", "bytes"):
        path = tmp_path / name / "tokenizer.json"
        ours = json.loads(path.read_text())
        merges = ours["model"]["merges"]
        if merges:  # the older spelling of merges is the same tokenizer
            path.write_text(json.dumps({**ours, "model": {
                **ours["model"], "merges": [" ".join(m) for m in merges]}}))
            assert native_name(path) == "cl100k_base"
        extra = {"content": "<|mine|>", "id": 300000, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True}
        edits = [{"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True,
                                    "trim_offsets": True, "use_regex": True}},
                 {"normalizer": {"type": "Lowercase"}},
                 {"post_processor": None},
                 {"decoder": None},
                 {"added_tokens": [*ours["added_tokens"], extra]},
                 {"model": {**ours["model"], "byte_fallback": True}}]
        for edit in edits[:1] if merges else edits:  # cl100k's 100K tokens take a while
            path.write_text(json.dumps({**ours, **edit}))
            assert native_name(path) is None, (name, edit)


def test_lora_adapter_exports_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmcli.checkpoint import base_reference, save_adapter
    from llmcli.model.lora import apply_lora, lora_meta

    base = llm_checkpoint(tmp_path / "base", **ARCHS["llama"])
    recipe = build_recipe({"name": "lora", "data": {"tokenizer": "bytes"},
                           "model": {**TINY, **ARCHS["llama"]},
                           "lora": {"rank": 2, "targets": ["qkv", "proj", "ffn_in"]}})
    net = Checkpoint.open(base).load()
    apply_lora(net, recipe.lora)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.05)  # B starts at zero: make the adapter count
    adapter = tmp_path / "lora" / "step-00000002.safetensors"
    save_adapter(adapter, net, recipe, tokenizer="bytes", lora=lora_meta(recipe.lora),
                 **base_reference(adapter.parent, base))
    merged = Checkpoint.open(adapter).load()
    export_hf(adapter.parent, Path("out"))
    hf = AutoModelForCausalLM.from_pretrained("out").eval()
    logits_and_greedy(hf, merged, eos=256)
    with torch.no_grad():
        ids = torch.arange(10).unsqueeze(0)
        assert not torch.allclose(Checkpoint.open(base).load()(ids)[0], merged(ids)[0])


def test_recipes_without_a_transformers_class_name_the_keys(tmp_path):
    seed = llm_checkpoint(tmp_path / "seed")  # the seed's defaults: output layer with a bias
    code, output = invoke("export", str(seed), "-o", "x")
    assert code == 2 and output.count("\n") == 1
    assert "model.bias (output_bias: auto)" in output and "model.output_bias=false" in output
    assert "model.positions=rope" in output and "model.activation=gelu or relu" in output
    mixed = llm_checkpoint(tmp_path / "mixed", positions="rope", norm="layernorm",
                           activation="gelu", output_bias=False)
    code, output = invoke("export", str(mixed), "-o", "x")
    assert code == 2 and "positions=rope, norm=layernorm, activation=gelu" in output
    assert not Path("x").exists()


def test_compact_vocabulary_and_unknown_format_are_refused(tmp_path):
    recipe = build_recipe({"name": "c", "data": {"tokenizer": "bytes", "vocab": "compact"},
                           "model": {**TINY, **ARCHS["llama"], "vocab_size": 4}})
    path = tmp_path / "c" / "step-00000001.safetensors"
    save_model(path, build_model(recipe.model), recipe, tokenizer="bytes", vocab_map=[10, 20, 30])
    with pytest.raises(UserError, match="compact vocabulary.*data.vocab=full"):
        export_hf(path, Path("x"))
    code, output = invoke("export", str(path), "-o", "x", "--format", "gguf")
    assert code == 2 and "--format gguf: the only format is hf" in output
    assert "gguf package" not in output  # there is no GGUF writer to install a package for


def test_export_never_leaves_a_half_written_folder(tmp_path, monkeypatch):
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    assert invoke("export", str(ckpt), "-o", "out")[0] == 0
    before = {p.name: p.read_bytes() for p in Path("out").iterdir()}
    code, output = invoke("export", str(ckpt), "-o", "out")
    assert code == 2 and "earlier export" in output and "--overwrite" in output

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    code, output = invoke("export", str(ckpt), "-o", "out", "--overwrite")
    assert code == 1 and "disk full" in output
    assert {p.name: p.read_bytes() for p in Path("out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_replaces_only_an_earlier_output_never_a_run_or_other_files(tmp_path):
    """--overwrite once deleted whatever -o named: a training run's checkpoints, anyone's files."""
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["llama"])
    run = tmp_path / "run"
    (run / "step-00000001.trainer.safetensors").write_bytes(b"optimizer state")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    other = Path("other")
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    kept = {run: snapshot(run), other: snapshot(other)}
    for command in (("export", str(ckpt)), ("import", "exported")):
        if command[0] == "import":
            assert invoke("export", str(ckpt), "-o", "exported")[0] == 0
        for target, what in ((run, "holds an llm run (3 files, e.g. step-00000001"),
                             (other, "holds notes.txt, sub/ (not part of an earlier")):
            for flags in ((), ("--overwrite",)):
                code, output = invoke(*command, "-o", str(target), *flags)
                assert code == 2 and output.count("\n") == 1, output
                assert what in output and "--overwrite never deletes" in output, output
                assert snapshot(target) == kept[target]
    # an earlier export or import is replaced; each refuses the other's output
    assert invoke("export", str(ckpt), "-o", "exported", "--overwrite")[0] == 0
    assert invoke("import", "exported", "-o", "imported")[0] == 0
    code, output = invoke("import", "exported", "-o", "imported")
    assert code == 2 and "already holds an earlier import" in output
    assert invoke("import", "exported", "-o", "imported", "--overwrite")[0] == 0
    code, output = invoke("export", str(ckpt), "-o", "imported", "--overwrite")
    assert code == 2 and "holds an llm run (1 file: step-00000000.safetensors)" in output
    code, output = invoke("import", "exported", "-o", "exported", "--overwrite")
    assert code == 2 and "config.json" in output and "not part of an earlier import" in output
    assert (Path("imported") / "step-00000000.safetensors").is_file()
    assert (Path("exported") / "model.safetensors").is_file()


def test_overwrite_never_deletes_a_model_folder_llm_did_not_export(tmp_path):
    """A folder transformers' save_pretrained wrote was taken for "an earlier export", and
    --overwrite deleted it."""
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    theirs = hf_folder(tmp_path / "theirs", "gpt2")
    kept = snapshot(theirs)
    for flags in ((), ("--overwrite",)):
        code, output = invoke("export", str(ckpt), "-o", str(theirs), *flags)
        assert code == 2 and output.count("\n") == 1, output
        assert "holds a transformers model llm did not export (config.json, " in output, output
        assert "--overwrite never deletes" in output, output
    assert snapshot(theirs) == kept
    export_hf(ckpt, Path("ours"))
    assert "llm_export" in safe_metadata(Path("ours/model.safetensors"))
    assert invoke("export", str(ckpt), "-o", "ours", "--overwrite")[0] == 0


def safe_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize("where", ["empty", "full"])
def test_the_current_directory_is_never_an_output(tmp_path, monkeypatch, where):
    """-o . once failed with "error: ValueError: PosixPath('.') has an empty name"; replacing
    it would delete the directory llm runs in."""
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if where == "full":
        (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    for command in (("export", str(ckpt)), ("import", str(tmp_path / "run"))):
        for out in (".", "..", str(cwd), f"../{cwd.name}"):
            for flags in ((), ("--overwrite",)):
                code, output = invoke(*command, "-o", out, *flags)
                assert code == 2 and output.count("\n") == 1, output
                assert "the current directory, which llm will not replace" in output, output
    code, output = invoke("export", str(ckpt), "-o", "x/y/..", "--overwrite")
    assert code == 2 and "not '..'" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "run"]
    assert [p.name for p in cwd.iterdir()] == (["notes.txt"] if where == "full" else [])


def test_import_o_is_a_path_whatever_its_folder_is_named(tmp_path):
    """-o /x/-dash was refused: "name '-dash' starts with -; the name becomes the directory
    checkpoints/<name>", though the directory is -o itself (llm pretrain -o takes it). Only a
    default output, checkpoints/<source's name>, needs the name to be a run name."""
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    export_hf(ckpt, tmp_path / "exported")
    code, output = invoke("import", str(tmp_path / "exported"), "-o", str(tmp_path / "-dash"))
    assert code == 0, output
    assert Checkpoint.open(tmp_path / "-dash").recipe.name == "exported"  # the source's name
    assert "llm generate ./-again" in invoke("import", str(tmp_path / "exported"), "-o",
                                             "-again")[1]  # a command to paste, not an option
    odd = tmp_path / "-odd"
    (tmp_path / "exported").rename(odd)
    code, output = invoke("import", str(odd))
    assert code == 2 and output.count("\n") == 1 and "give the run directory with -o" in output
    assert not Path("checkpoints/-odd").exists()


def test_outputs_that_cannot_be_folders_are_one_line(tmp_path):
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    Path("file").write_text("mine")
    Path("loop-a").symlink_to("loop-b")
    Path("loop-b").symlink_to("loop-a")
    for out, message in (("file/x", "file is a file, not a directory"),
                         ("loop-a/x", "symbolic link to nothing (or a link loop)"),
                         ("loop-a", "symbolic link to nothing (or a link loop)")):
        for command in (("export", str(ckpt)), ("import", str(tmp_path / "run"))):
            code, output = invoke(*command, "-o", out, "--overwrite")
            assert code == 2 and output.count("\n") == 1 and message in output, output
    assert Path("file").read_text() == "mine"


def test_an_output_that_cannot_be_created_is_named_as_given(tmp_path):
    """A read-only place named llm's hidden folder: "ro/.out.b6aseo8j.tmp: read-only file
    system". /proc takes no new folders, for root too."""
    ckpt = llm_checkpoint(tmp_path / "run", **ARCHS["gpt2"])
    export_hf(ckpt, tmp_path / "exported")
    for out in ("/proc/llm-test-out", "/proc/llm-test-dir/out"):
        for command in (("export", str(ckpt)), ("import", str(tmp_path / "exported"))):
            code, output = invoke(*command, "-o", out)
            assert code == 2 and ".tmp" not in output, output
            assert output.splitlines()[-1].startswith(f"error: {out}: "), output


def test_a_run_started_in_the_target_meanwhile_is_not_replaced(tmp_path):
    from llmcli.interop.staging import staged_folder

    target = tmp_path / "out"
    with pytest.raises(UserError, match="holds an llm run"), \
            staged_folder(target, True, "export") as tmp:
        (tmp / "config.json").write_text("{}")
        target.mkdir()
        (target / "metrics.jsonl").write_text("{}\n")  # a training run began there
    assert [p.name for p in target.iterdir()] == ["metrics.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_ctrl_c_while_an_export_replaces_the_old_one_loses_neither(tmp_path, monkeypatch):
    """Ctrl-C between the two renames left the old export hidden as .out.XXXX.old and removed
    the new one: nothing under -o at all."""
    import os
    import signal

    from llmcli.interop.staging import staged_folder

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == 1:
            signal.raise_signal(signal.SIGINT)  # arrives right after the first rename

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("llmcli.interop.staging.check_target", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt), staged_folder(target, True, "export") as tmp:
        (tmp / "config.json").write_text("new")
    assert len(renames) == 2  # the interrupt waited for the swap
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no hidden old or staged folder


# ---------------------------------------------------------------------------------------------
# Import


def small_bpe(folder: Path) -> int:
    """A byte-level BPE trained here (not one of llm's), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. Colour red, blue?"]
                            * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def hf_folder(folder: Path, kind: str, **config) -> Path:
    """A tiny transformers GPT-2 or Llama with its tokenizer, written by save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = small_bpe(folder)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**{
            "vocab_size": vocab, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
            "bos_token_id": 0, "eos_token_id": 0, **config}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{
            "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 64, "rope_theta": 1000.0, "bos_token_id": 0,
            "eos_token_id": 0, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_gives_transformers_logits_greedy_tokens_and_tokenizer(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = hf_folder(tmp_path / "src", kind)
    code, output = invoke("import", str(source), "-o", "checkpoints/tiny-hf")
    assert code == 0, output
    assert "wrote checkpoints/tiny-hf/step-00000000.safetensors" in output
    ckpt = Checkpoint.open("checkpoints/tiny-hf")
    assert ckpt.tokenizer.startswith("hf-") and ckpt.recipe.data.tokenizer == ckpt.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    logits_and_greedy(hf, ckpt.load(), eos=0)
    ours, theirs = get_tokenizer(ckpt.tokenizer), AutoTokenizer.from_pretrained(source)
    for text in [*TEXTS, "The quick brown fox"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert ours.eot_id == 0 and ours.encode("<|endoftext|>") != [0]  # special text is text
    code, output = invoke("generate", "checkpoints/tiny-hf", "The quick", "--strategy", "greedy",
                          "--max-new-tokens", "5")
    assert code == 0, output
    code, output = invoke("params", "checkpoints/tiny-hf", "--json")
    assert code == 0 and json.loads(output)["total"] == sum(
        p.numel() for p in hf.parameters())
    embedding = json.loads(output)["parts"][0]  # GPT-2 ties it to the output layer
    assert embedding["name"] == "token embedding"
    assert embedding["total"] == hf.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_stored_head_that_differs_from_a_tied_embedding_is_kept_as_transformers_does(
        tmp_path, kind):
    """tie_word_embeddings true with a different lm_head.weight in the file: the head was
    silently dropped (logits far from transformers', which keeps it and unties)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    source = hf_folder(tmp_path / "src", kind, tie_word_embeddings=True)
    path = source / "model.safetensors"
    tensors = load_file(path)
    embedding = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    tensors["lm_head.weight"] = tensors[embedding].clone()  # the tied copy: still tied
    save_file(tensors, path, metadata={"format": "pt"})
    code, output = invoke("import", str(source), "-o", "checkpoints/same")
    assert code == 0 and "warning" not in output, output
    assert Checkpoint.open("checkpoints/same").recipe.model.tie_embeddings
    tensors["lm_head.weight"] = torch.randn_like(tensors[embedding]) * 0.15
    save_file(tensors, path, metadata={"format": "pt"})
    code, output = invoke("import", str(source), "-o", "checkpoints/x")
    assert code == 0, output
    assert "lm_head.weight that differs from the token embedding; imported untied" in output
    ckpt = Checkpoint.open("checkpoints/x")
    assert not ckpt.recipe.model.tie_embeddings
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    logits_and_greedy(hf, ckpt.load(), eos=0)


def with_post_processor(folder: Path, processor: dict) -> None:
    path = folder / "tokenizer.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "post_processor": processor}))


BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                     "tokens": ["<|endoftext|>"]}}}


def test_a_sequence_starts_with_the_bos_the_tokenizer_adds(tmp_path):
    """A Llama tokenizer whose post-processor puts BOS first: llm encoded prompts without it,
    so every prompt differed from transformers' tokenizer(text) and greedy text differed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli.data.instruct import ModelVocab, encode_records
    from llmcli.generate.pipeline import load_generator
    from llmcli.inspect.score import score_text

    source = hf_folder(tmp_path / "src", "llama")
    with_post_processor(source, BOS_TEMPLATE)
    import_hf(str(source), Path("run"))
    theirs = AutoTokenizer.from_pretrained(source)
    ours = get_tokenizer(Checkpoint.open("run").tokenizer)
    assert ours.start_ids == (0,)
    for text in ("The quick brown fox", "Colour red"):
        assert ours.encode_start(text) == theirs(text).input_ids
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
    code, output = invoke("generate", "run", "The quick", "-s", "greedy", "-n", "8", "--json")
    assert code == 0, output
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    enc = theirs("The quick", return_tensors="pt")
    new = hf.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=0,
                      pad_token_id=0)[0, enc.input_ids.shape[1]:].tolist()
    mine = json.loads(output[output.index("{"):])["results"][0]["token_ids"]
    assert mine == new[:len(mine)] and (len(mine) == 8 or new[len(mine)] == 0)
    gen = load_generator("run", device="cpu")
    assert gen.encode("") == [0]  # a document's start
    score = score_text(gen, "The quick brown fox")
    assert score.start_id == 0 and len(score.tokens) == len(ours.encode("The quick brown fox"))
    [example], _ = encode_records([{"instruction": "Colour?", "input": "", "output": "red"}],
                                  ours, ModelVocab(gen.vocab.vocab_size, None),
                                  template="Q: {instruction}\nA: ", context_length=64)
    prompt = ours.encode_start("Q: Colour?\nA: ")
    assert example.ids == [*prompt, *ours.encode("red"), 0]  # the answer gets no BOS


@pytest.mark.parametrize("bos", [0, 5])  # end-of-text itself (id 0), or a token of its own
@pytest.mark.parametrize("workers", [1, 2])
def test_each_pretraining_document_starts_with_the_bos_the_tokenizer_adds(tmp_path, bos,
                                                                          workers):
    """Documents tokenized with an imported Llama tokenizer lacked its BOS, unlike the
    prompts and records the model then saw, and unlike how Llama was trained."""
    from llmcli.data.token_cache import find_tokens, sidecar_path
    from llmcli.data.tokenize import tokenize_files

    source = hf_folder(tmp_path / "src", "llama")
    name = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    token = next(t for t, i in name.items() if i == bos)  # any token serves as a BOS
    with_post_processor(source, {**BOS_TEMPLATE,
                                 "single": [{"SpecialToken": {"id": token, "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {token: {"id": token, "ids": [bos],
                                                            "tokens": [token]}}})
    import_hf(str(source), Path("run"))
    tok = get_tokenizer(Checkpoint.open("run").tokenizer)
    assert tok.start_ids == (bos,) and tok.eot_id == 0
    texts = ["The quick brown fox", "Colour red"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    out = tmp_path / "c.tokens"
    meta = tokenize_files(files, out, tokenizer=tok.name, workers=workers)
    ids = np.fromfile(out, dtype="<u4").tolist()
    between = [0] if bos == 0 else [0, bos]
    assert ids == [bos, *tok.encode(texts[0]), *between, *tok.encode(texts[1])]
    assert meta["start_ids"] == [bos] and meta["documents"] == 2
    assert find_tokens(files, tok.name, tmp_path) is None  # named c.tokens, not the cache's
    cached = tmp_path / "token-cache"
    cached.mkdir()
    tokenize_files(files, cached / "0+1.tokens", tokenizer=tok.name)
    assert find_tokens(files, tok.name, cached) is not None
    side = json.loads(sidecar_path(cached / "0+1.tokens").read_text())
    del side["start_ids"]  # made before documents began with the BOS: made again
    sidecar_path(cached / "0+1.tokens").write_text(json.dumps(side))
    assert find_tokens(files, tok.name, cached) is None


def test_post_processors_llm_cannot_reproduce_are_refused_at_import(tmp_path):
    source = hf_folder(tmp_path / "src", "gpt2")
    with_post_processor(source, {**BOS_TEMPLATE,
                                 "single": [{"Sequence": {"id": "A", "type_id": 1}}]})
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 2 and output.count("\n") == 1, output
    assert "the tokenizer's post-processor gives type ids other than 0" in output, output
    assert not Path("run").exists()


def test_tokens_a_post_processor_appends_are_left_out_of_prompts_and_said(tmp_path):
    source = hf_folder(tmp_path / "src", "gpt2")
    with_post_processor(source, {**BOS_TEMPLATE, "single": [
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}]})
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 0, output
    assert "post-processor appends 1 token(s) to every sequence" in output, output
    from llmcli.generate.pipeline import load_generator

    gen = load_generator("run", device="cpu")
    assert gen.encode("The quick") == gen.tokenizer.encode("The quick")


def test_round_trip_import_export_import_gives_identical_tensors(tmp_path):
    source = hf_folder(tmp_path / "src", "llama", tie_word_embeddings=True)
    first = import_hf(str(source), Path("checkpoints/a"))
    export_hf("checkpoints/a", tmp_path / "exported")
    second = import_hf(str(tmp_path / "exported"), Path("checkpoints/b"))
    assert first.tokenizer == second.tokenizer
    assert first.recipe.model == second.recipe.model
    a, b = load_file(first.path), load_file(second.path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # llm's own tokenizers come back as themselves
    ckpt = llm_checkpoint(tmp_path / "own", **ARCHS["gpt2"])
    export_hf(ckpt, tmp_path / "own-hf")
    back = import_hf(str(tmp_path / "own-hf"), Path("checkpoints/own"))
    assert back.tokenizer == "bytes"
    mine, theirs = load_file(ckpt), load_file(back.path)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_finetune_lora_on_an_imported_gpt2_then_export_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    source = hf_folder(tmp_path / "src", "gpt2")
    import_hf(str(source), Path("checkpoints/gpt2-tiny"))
    records = [{"instruction": f"Colour {i}?", "input": "", "output": c}
               for i, c in enumerate(["red", "blue", "green", "black"] * 5)]
    Path("records.json").write_text(json.dumps(records))
    Path("lora.yaml").write_text(
        "data: {source: records.json, val_fraction: 0.2}\n"
        "finetune: {init: checkpoints/gpt2-tiny, template: \"Q: {instruction}\\nA: \"}\n"
        "lora: {rank: 4, targets: [qkv, proj, ffn_in]}\n"
        "train: {batch_size: 4, max_iters: 4, lr: 0.05, eval_interval: 2, eval_iters: 1,\n"
        "        checkpoint_interval: 2, precision: fp32}\n")
    code, output = invoke("finetune", "lora.yaml", "--device", "cpu")
    assert code == 0, output
    adapter = Checkpoint.open("checkpoints/lora")
    assert adapter.is_adapter and adapter.tokenizer.startswith("hf-")
    code, output = invoke("generate", "checkpoints/lora", "--instruct", "Colour 3?",
                          "--strategy", "greedy", "--max-new-tokens", "3")
    assert code == 0, output
    export_hf("checkpoints/lora", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    logits_and_greedy(hf, adapter.load(), eos=0)


def test_hub_layouts_import(tmp_path):
    """The Hub's gpt2: GPT2Model names (no "transformer."), causal-mask buffers, no eos_token in
    tokenizer_config.json; and weights in shards listed by model.safetensors.index.json."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    source = hf_folder(tmp_path / "gpt2", "gpt2")
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    tensors = load_file(source / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)}
    save_file(old, source / "model.safetensors", metadata={"format": "pt"})
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    result = import_hf(str(source))
    assert result.path == Path("checkpoints/gpt2/step-00000000.safetensors")
    assert result.eos == "<|endoftext|>"  # from config.json's eos_token_id
    logits_and_greedy(hf, Checkpoint.open(result.path).load(), eos=0)

    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:7],
              "model-00002-of-00002.safetensors": names[7:]}
    (source / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, source / file, metadata={"format": "pt"})
    (source / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    sharded = import_hf(str(source), Path("checkpoints/sharded"))
    a, b = load_file(result.path), load_file(sharded.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_weights_are_refused_unread(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "unpickled",))

    source = hf_folder(tmp_path / "src", "gpt2")
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    code, output = invoke("import", str(source))
    assert code == 2 and "pytorch_model.bin" in output and "never unpickles" in output
    assert not (tmp_path / "unpickled").exists()
    assert not Path("checkpoints/src").exists()


def test_unsupported_architectures_are_named(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    code, output = invoke("import", str(folder))
    assert code == 2 and "BertForMaskedLM is not supported" in output
    source = hf_folder(tmp_path / "gqa", "llama", num_key_value_heads=2)
    code, output = invoke("import", str(source))
    assert code == 2 and "grouped-query attention" in output and output.count("\n") == 1
    source = hf_folder(tmp_path / "exact-gelu", "gpt2", activation_function="gelu")
    code, output = invoke("import", str(source))
    assert code == 2 and "activation_function is 'gelu'" in output


def config_folder(folder: Path, config: dict) -> Path:
    """A folder holding only config.json: the config is checked before anything else is read."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                "num_attention_heads": 4, "max_position_embeddings": 64,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_head": 4}
BAD_VALUES = [  # (config, the one line's specific part): null, wrong types, out of range
    (LLAMA_CONFIG, {"rms_norm_eps": None}, "rms_norm_eps is null; expected a number in (0, 1]"),
    (LLAMA_CONFIG, {"num_attention_heads": 0},
     "num_attention_heads is 0; expected an integer in [1, "),
    (LLAMA_CONFIG, {"hidden_size": "32"}, 'hidden_size is "32" (a string); expected an integer'),
    (LLAMA_CONFIG, {"hidden_size": 32.0}, "hidden_size is 32.0; expected an integer"),
    (LLAMA_CONFIG, {"num_hidden_layers": -2}, "num_hidden_layers is -2; expected an integer in"),
    (LLAMA_CONFIG, {"intermediate_size": [64]}, "intermediate_size is [64] (a list)"),
    (LLAMA_CONFIG, {"tie_word_embeddings": "false"},
     'tie_word_embeddings is "false" (a string); expected true or false'),
    (LLAMA_CONFIG, {"attention_bias": 1}, "attention_bias is 1; expected true or false"),
    (LLAMA_CONFIG, {"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    (LLAMA_CONFIG, {"vocab_size": None}, "vocab_size is null"),
    (LLAMA_CONFIG, {"rope_parameters": {"rope_theta": None}},
     "rope_parameters.rope_theta is null; expected a number in [1, "),
    (LLAMA_CONFIG, {"rope_parameters": [10000]}, "rope_parameters is [10000] (a list)"),
    (LLAMA_CONFIG, {"rope_scaling": {"rope_type": 2}}, "rope_scaling.rope_type is 2"),
    (LLAMA_CONFIG, {"hidden_act": None}, None),  # null: transformers' default, silu
    (LLAMA_CONFIG, {"num_key_value_heads": 8},
     "num_key_value_heads is 8; expected at most num_attention_heads (4)"),
    (LLAMA_CONFIG, {"hidden_size": 30}, "hidden_size 30 is not divisible by num_attention_heads 4"),
    (LLAMA_CONFIG, {"hidden_size": 12},
     "the head size hidden_size / num_attention_heads = 3 is odd"),
    (LLAMA_CONFIG, {"architectures": 5}, "architectures is 5; expected a list of strings"),
    (GPT2_CONFIG, {"n_embd": [32]}, "n_embd is [32] (a list); expected an integer in [1, "),
    (GPT2_CONFIG, {"n_head": True}, "n_head is true (a boolean); expected an integer"),
    (GPT2_CONFIG, {"n_layer": 0}, "n_layer is 0; expected an integer in [1, 1024]"),
    (GPT2_CONFIG, {"n_inner": 0}, "n_inner is 0; expected an integer in [1, "),
    (GPT2_CONFIG, {"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon is NaN"),
    (GPT2_CONFIG, {"resid_pdrop": 1.5}, "resid_pdrop is 1.5; expected a number in [0, 1)"),
    (GPT2_CONFIG, {"initializer_range": "0.02"}, 'initializer_range is "0.02" (a string)'),
    (GPT2_CONFIG, {"scale_attn_weights": "no"}, 'scale_attn_weights is "no" (a string)'),
    (GPT2_CONFIG, {"activation_function": ["relu"]}, "activation_function is [\"relu\"] (a list)"),
    (GPT2_CONFIG, {"n_embd": 30}, "n_embd 30 is not divisible by n_head 4"),
    (GPT2_CONFIG, {"model_type": 2}, "model_type is 2; expected a string"),
]


@pytest.mark.parametrize(("base", "update", "message"), BAD_VALUES)
def test_bad_config_values_are_one_line_naming_key_and_file(tmp_path, base, update, message):
    """A null or mistyped config.json value leaked "error: TypeError: float() argument ..."."""
    folder = config_folder(tmp_path / "src", {**base, **update})
    code, output = invoke("import", str(folder))
    if message is None:  # accepted: the next problem is the missing weights
        assert code == 2 and "no model.safetensors" in output
        return
    assert code == 2 and output.count("\n") == 1, output
    assert output.startswith(f"error: {folder / 'config.json'}: {message}"), output
    assert not Path("checkpoints").exists()


@pytest.mark.parametrize(("update", "message"), [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_my.MyLlama"}},
     "auto_map names custom modelling code"),
    ({"model_type": "my_llama"}, "model_type 'my_llama' is not 'llama'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not 'llama'"),
])
def test_custom_modelling_code_under_a_known_class_name_is_refused(tmp_path, update, message):
    """A config with auto_map (its own code) or another model_type under the name
    LlamaForCausalLM was imported as a plain Llama: other logits than transformers gives."""
    folder = config_folder(tmp_path / "src", {**LLAMA_CONFIG, **update})
    code, output = invoke("import", str(folder))
    assert code == 2 and output.count("\n") == 1, output
    assert message in output and "it cannot be imported" in output, output
    assert import_class({**LLAMA_CONFIG, "model_type": "llama"}, "x") == "LlamaForCausalLM"


UNSUPPORTED = [  # keys transformers honours (or honoured) that llm's model cannot compute
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "RoPE is scaled (rope_scaling type 'linear')"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters": None},
     "RoPE is scaled (rope_scaling rope_type 'dynamic')"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "RoPE is scaled (rope_parameters rope_type 'yarn')"),
    ({"partial_rotary_factor": 0.5}, "RoPE turns only part of each head"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
     "partial_rotary_factor 0.25"),
    ({"sliding_window": 4}, "sliding_window 4 < max_position_embeddings 64"),
    ({"head_dim": 16}, "head_dim is 16, not hidden_size / num_attention_heads = 8"),
    ({"num_key_value_heads": 2}, "grouped-query attention"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
]
GPT2_UNSUPPORTED = [
    ({"scale_attn_weights": False}, "scale_attn_weights false"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"add_cross_attention": True}, "cross-attention"),
    ({"activation_function": "gelu"}, "activation_function is 'gelu'"),
    ({"activation_function": "silu"}, "activation_function is 'silu'"),
]


@pytest.mark.parametrize(("base", "update", "message"),
                         [(LLAMA_CONFIG, *case) for case in UNSUPPORTED]
                         + [(GPT2_CONFIG, *case) for case in GPT2_UNSUPPORTED])
def test_keys_that_change_the_computation_are_refused(tmp_path, base, update, message):
    """rope_scaling beside rope_parameters (as a hand-edited or converted config has it) was
    silently dropped, so the import computed other logits than transformers."""
    folder = config_folder(tmp_path / "src", {**base, **update})
    code, output = invoke("import", str(folder))
    assert code == 2 and output.count("\n") == 1, output
    assert message in output and "it cannot be imported" in output, output


@pytest.mark.parametrize(("kind", "config", "edit"), [
    ("llama", {"attention_bias": True}, {}),
    ("llama", {"mlp_bias": True}, {}),
    ("llama", {"tie_word_embeddings": True, "sliding_window": None}, {"sliding_window": 64}),
    # a non-empty rope_scaling replaces rope_parameters in transformers: rope_theta 10000, not 1000
    ("llama", {}, {"rope_scaling": {"rope_type": "default"}}),
    ("llama", {}, {"rope_scaling": None, "head_dim": 8, "partial_rotary_factor": 1.0}),
    ("gpt2", {"tie_word_embeddings": False, "n_inner": 48, "activation_function": "relu"}, {}),
    ("gpt2", {"reorder_and_upcast_attn": True, "activation_function": "gelu_pytorch_tanh"}, {}),
])
def test_keys_that_map_give_transformers_logits(tmp_path, kind, config, edit):
    from transformers import AutoModelForCausalLM

    source = hf_folder(tmp_path / "src", kind, **config)
    path = source / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    result = import_hf(str(source), Path("checkpoints/x"))
    logits_and_greedy(hf, Checkpoint.open(result.path).load(), eos=0)


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    code, output = invoke("import", "llm-tests/no-such-model")
    assert code == 1 and output.count("\n") == 1
    assert "HF_HUB_OFFLINE is set" in output and "hf download llm-tests/no-such-model" in output
    code, output = invoke("import", "./no/such/folder")
    assert code == 2 and "no such folder" in output
    for malformed in ("a/b--c", "a/" + "x" * 97, "a/b.", "a/é"):  # the Hub's own rules
        code, output = invoke("import", malformed)
        assert code == 2 and "not a Hugging Face model id" in output, (malformed, output)


def partial_snapshot(cache: Path, source: Path) -> Path:
    """The Hub cache's snapshot of llm-tests/tiny as an interrupted download leaves it:
    config and tokenizer, no weights."""
    import shutil

    repo = cache / "models--llm-tests--tiny"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, snap / name)
    return snap


def test_a_partly_cached_hub_model_is_downloaded_or_said_to_be_incomplete(tmp_path,
                                                                         monkeypatch):
    """A cache snapshot an interrupted download left (config and tokenizer, no weights) was
    taken as the model: "no model.safetensors", exit 2, and the Hub never asked, forever."""
    import shutil

    from huggingface_hub import constants

    from llmcli.interop import hub

    source = hf_folder(tmp_path / "src", "gpt2")
    cache = tmp_path / "hub-cache"
    snap = partial_snapshot(cache, source)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    asked = []
    monkeypatch.setattr(hub, "probe",
                        lambda repo_id, label: (None, asked.append(repo_id) or "test: offline"))
    code, output = invoke("import", "llm-tests/tiny")
    assert code == 1 and asked == ["llm-tests/tiny"], output
    assert "only partly in the Hugging Face cache (model.safetensors missing" in output, output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(source / "model.safetensors", snap / "model-00001-of-00002.safetensors")
    code, output = invoke("import", "llm-tests/tiny")
    assert code == 1 and output.count("\n") == 1 and len(asked) == 1, output
    assert "(shard model-00002-of-00002.safetensors missing" in output, output
    assert "HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to finish the download" in output
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model-00001-of-00002.safetensors").unlink()
    shutil.copy(source / "model.safetensors", snap / "model.safetensors")
    code, output = invoke("import", "llm-tests/tiny")  # complete: the cache is the model
    assert code == 0 and len(asked) == 1, output


def test_a_damaged_weights_file_in_the_hub_cache_says_to_delete_it(tmp_path, monkeypatch):
    """huggingface_hub never checks a cached file again: "was it fully written?" for ever."""
    from huggingface_hub import constants

    source = hf_folder(tmp_path / "src", "gpt2")
    cache = tmp_path / "hub-cache"
    snap = partial_snapshot(cache, source)
    (snap / "model.safetensors").write_bytes(b"\0" * 64)  # right place, wrong bytes
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, output = invoke("import", "llm-tests/tiny")
    assert code == 2 and output.count("error:") == 1, output
    assert "the Hugging Face cache holds a damaged copy; delete" in output
    assert "hf cache rm model/llm-tests/tiny" in output


# A Hub that stalls, fails or gates (a fresh process each: the hub reads its env at import)


@pytest.fixture
def fake_hub(tmp_path):
    """A function (files modes, api mode, folder) -> a FakeHub serving a tiny GPT-2."""
    from helpers_hub import FakeHub

    hubs: list[FakeHub] = []

    def start(files: dict[str, str] | None = None, api: str = "ok",
              folder: Path | None = None) -> FakeHub:
        hubs.append(FakeHub(folder or hf_folder(tmp_path / "repo", "gpt2"), files, api))
        return hubs[-1]

    yield start
    for hub in hubs:
        hub.close()


def llm_process(args: list[str], hub_url: str, home: Path, **env: str):
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    environ.update(HF_HOME=str(home), HF_ENDPOINT=hub_url, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-m", "llmcli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environ)


def test_ctrl_c_while_the_hub_stalls_a_download_ends_the_import_at_once(fake_hub, tmp_path):
    """The download's worker threads kept retrying after Ctrl-C: it ran on until killed."""
    import signal

    hub = fake_hub({"*.safetensors": "stall"})
    proc = llm_process(["import", "me/tiny", "-o", str(tmp_path / "run")], hub.url,
                       tmp_path / "hf")
    assert hub.file_asked.wait(120), proc.communicate()
    proc.send_signal(signal.SIGINT)
    stderr = stderr_when_ended(proc, 60, "llm import went on after Ctrl-C")
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def stderr_when_ended(proc, seconds: float, otherwise: str) -> str:
    """The process's standard error once it has ended; killed, and `otherwise` raised, if it
    has not within `seconds`."""
    import subprocess

    try:
        return proc.communicate(timeout=seconds)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(otherwise) from None


@pytest.mark.parametrize("files, api, expected", [
    ({"*.safetensors": "stall"}, "ok",
     "me/tiny: the Hugging Face Hub stopped answering during the download (no answer to a file "
     "request within 1 s)"),
    ({"*.safetensors": "500"}, "ok",
     "me/tiny: the Hugging Face Hub answered 500 Internal Server Error for model.safetensors; "
     "try again later"),
    ({}, "500", "me/tiny: the Hugging Face Hub answered 500 Internal Server Error for the model "
     "lookup"),
    ({"*": "gated"}, "ok", "me/tiny: this model is gated; accept its licence on "
     "http://127.0.0.1:"),
    ({}, "403", "me/tiny: the Hugging Face Hub answered 403 Forbidden for the model lookup; "
     "log in"),
])
def test_a_hub_that_stalls_fails_or_gates_is_one_line_after_one_try(fake_hub, tmp_path, files,
                                                                    api, expected):
    """import waited through 6 tries (minutes), printed the library's retry lines and bars, and
    called every error answer "cannot be reached" or "download failed"."""
    hub = fake_hub(files, api)
    proc = llm_process(["import", "me/tiny", "-o", str(tmp_path / "run")], hub.url,
                       tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1")
    stderr = stderr_when_ended(proc, 120, "llm import kept retrying")
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), stderr
    for chatter in ("Retrying", "thrown while requesting", "Fetching", "Traceback"):
        assert chatter not in stderr, stderr
    assert not (tmp_path / "run").exists()


def test_a_hub_download_shows_no_library_bars_off_a_terminal(fake_hub, tmp_path):
    hub = fake_hub()
    proc = llm_process(["import", "me/tiny", "-o", str(tmp_path / "run")], hub.url,
                       tmp_path / "hf")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "Fetching" not in stderr and "%|" not in stderr, stderr


def test_a_hub_repository_with_only_pickled_weights_is_refused_before_downloading(fake_hub,
                                                                                  tmp_path):
    """It was downloaded without weights and then said "…/snapshots/<sha>: no model.safetensors;
    give the folder save_pretrained wrote"."""
    folder = hf_folder(tmp_path / "repo", "gpt2")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    hub = fake_hub(folder=folder)
    proc = llm_process(["import", "me/tiny", "-o", str(tmp_path / "run")], hub.url,
                       tmp_path / "hf")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert stderr.startswith("looking up me/tiny"), stderr
    assert "error: me/tiny: the repository has only pickled weights (pytorch_model.bin)" in stderr
    assert not hub.file_asked.is_set()


def test_imported_tokenizer_names_are_checked(tmp_path):
    from llmcli.interop.tokenizer_store import roots

    source = hf_folder(tmp_path / "src", "gpt2")
    result = import_hf(str(source), Path("checkpoints/g"))
    with pytest.raises(UserError, match="data.tokenizer"):
        build_recipe({"data": {"tokenizer": "hf-../../etc"}})
    build_recipe({"data": {"tokenizer": result.tokenizer}})
    copies = [root / result.tokenizer for root in roots() if (root / result.tokenizer).is_dir()]
    assert len(copies) == 2  # the run's own and the user's cache
    for copy in copies:
        (copy / "tokenizer_config.json").write_text("{}")
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError, match="changed after the import"):
            get_tokenizer(result.tokenizer)
    finally:
        get_tokenizer.cache_clear()


def test_import_prints_follow_up_commands_a_shell_takes_as_they_are(tmp_path):
    import shlex

    source = hf_folder(tmp_path / "ex ü" / "one", "gpt2")
    code, output = invoke("import", str(source), "-o", "imp ü")
    assert code == 0, output
    line = next(x for x in output.splitlines() if x.strip().startswith("next"))
    generate, finetune = line.split("next", 1)[1].split("·")
    assert shlex.split(generate) == ["llm", "generate", "imp ü", "Hello"]
    assert shlex.split(finetune) == ["llm", "finetune", "RECIPE", "finetune.init=imp ü"]


def test_an_imported_run_works_from_any_folder_and_after_a_move(tmp_path, monkeypatch):
    """The run keeps its tokenizer: generate it from elsewhere, moved, with no cache left."""
    import shutil

    from llmcli.interop import tokenizer_store

    source = hf_folder(tmp_path / "src", "gpt2")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    result = import_hf(str(source), tmp_path / "runs" / "g")
    assert (tmp_path / "runs" / "g" / "tokenizers" / result.tokenizer).is_dir()
    shutil.move(tmp_path / "runs" / "g", tmp_path / "moved")
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(tokenizer_store, "_runs", [])
    get_tokenizer.cache_clear()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    try:
        code, output = invoke("generate", str(tmp_path / "moved"), "Hello", "-n", "3",
                              "--strategy", "greedy")
    finally:
        get_tokenizer.cache_clear()
    assert code == 0, output
    assert not (tmp_path / "b" / "checkpoints").exists()
    code, output = invoke("import", str(source), "-o", str(tmp_path / "moved"), "--overwrite")
    assert code == 0, output  # an earlier import, its tokenizer folder included, is replaced


def test_a_full_fine_tune_of_an_imported_model_keeps_its_tokenizer(tmp_path, monkeypatch):
    """The fine-tuned run alone, moved, with the imported run and the cache gone, still works:
    it keeps its own copy of the tokenizer, as the imported run does."""
    import shutil

    from llmcli.interop import tokenizer_store

    result = import_hf(str(hf_folder(tmp_path / "src", "gpt2")), Path("checkpoints/g"))
    Path("records.json").write_text(json.dumps(
        [{"instruction": f"Colour {i}?", "input": "", "output": c}
         for i, c in enumerate(["red", "blue", "green", "black"] * 3)]))
    Path("full.yaml").write_text(
        "data: {source: records.json, val_fraction: 0.25}\n"
        "finetune: {init: checkpoints/g, template: alpaca-short}\n"
        "train: {batch_size: 2, max_iters: 2, eval_iters: 1, precision: fp32}\n")
    code, output = invoke("finetune", "full.yaml", "--device", "cpu", "-o", "checkpoints/ft")
    assert code == 0, output
    kept = Path("checkpoints/ft/tokenizers") / result.tokenizer
    assert (kept / "tokenizer.json").read_bytes() == (
        Path("checkpoints/g/tokenizers") / result.tokenizer / "tokenizer.json").read_bytes()
    shutil.move("checkpoints/ft", tmp_path / "moved")
    shutil.rmtree("checkpoints")
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(tokenizer_store, "_runs", [])
    get_tokenizer.cache_clear()
    try:
        code, output = invoke("generate", str(tmp_path / "moved"), "--instruct", "Colour 1?",
                              "-n", "3", "--strategy", "greedy")
    finally:
        get_tokenizer.cache_clear()
    assert code == 0, output


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_pipe_for_a_tokenizer_file_is_refused_not_missing_or_waited_on(tmp_path, name):
    """A FIFO tokenizer.json was reported as "no tokenizer.json"; a FIFO tokenizer_config.json
    hung the import. A timer opens the pipe's other end, so a regression fails, not hangs."""
    import os
    import threading

    source = hf_folder(tmp_path / "src", "gpt2")
    fifo = source / name
    fifo.unlink()
    os.mkfifo(fifo)

    def unblock() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(10, unblock)
    timer.start()
    try:
        code, output = invoke("import", str(source), "-o", str(tmp_path / "run"))
    finally:
        timer.cancel()
    assert code == 2 and f"{name}: not a regular file" in output, output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Tokenizers whose decoder is not byte-level


WORDS = "the sales team is selling to customers. don't stop, isn't it? "


def decoder_tokenizer(folder: Path, decoder: str) -> Any:
    """A small tokenizer trained here whose tokenizer.json has `decoder`, saved as transformers
    would (PreTrainedTokenizerFast.save_pretrained)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[UNK]", "[SEP]"]
    if decoder.startswith("wordpiece"):
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=200, special_tokens=special,
                                                 show_progress=False)
    elif decoder == "bpe-suffix":
        tok = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special,
                                      end_of_word_suffix="</w>", show_progress=False)
    elif decoder == "none":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=special, show_progress=False)
    else:  # SentencePiece-like: ▁ for spaces
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    tok.decoder = {
        "wordpiece": decoders.WordPiece(),
        "wordpiece-strip": decoders.Sequence([decoders.WordPiece(cleanup=False),
                                              decoders.Strip("s", 0, 1)]),
        "bpe-suffix": decoders.BPEDecoder("</w>"),
        "none": None,
        "metaspace": decoders.Metaspace(),
        "replace-strip-fuse": decoders.Sequence([
            decoders.Replace(Regex("e+"), "E"), decoders.Strip("\u2581", 1, 0), decoders.Fuse(),
            decoders.Replace("a", "A")]),
        "ctc": decoders.CTC(),
        "replace-across-tokens": decoders.Sequence([decoders.Fuse(), decoders.Replace("ea", "X")]),
        "strip-after-byte-fallback": decoders.Sequence([decoders.ByteFallback(),
                                                        decoders.Strip(" ", 1, 0)]),
    }[decoder]
    tok.train_from_iterator([WORDS] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[SEP]", unk_token="[UNK]")
    fast.save_pretrained(folder)
    return fast


def continuation(theirs: Any, ids: list[int]) -> str:
    """transformers' text of `ids` inside a text: between two [UNK] tokens (which no decoder
    here changes), whose own text is then cut off."""
    def text(*x: int) -> str:
        return theirs.decode(list(x), skip_special_tokens=False)

    unk = theirs.convert_tokens_to_ids("[UNK]")
    first, both, whole = text(unk), text(unk, unk), text(unk, *ids, unk)
    return whole[len(first):len(whole) - len(both) + len(first)]


@pytest.mark.parametrize("decoder", ["wordpiece", "wordpiece-strip", "bpe-suffix", "none",
                                     "metaspace", "replace-strip-fuse"])
def test_tokens_spell_the_text_transformers_decodes(tmp_path, decoder):
    """A WordPiece run printed "teamteamteam" (each token decoded alone, the pieces joined)
    where transformers gives "team team team": every id now has its bytes inside a text."""
    from llmcli.interop.tokenizer_store import HFTokenizer

    theirs = decoder_tokenizer(tmp_path / "tok", decoder)
    ours = HFTokenizer("hf-0000000000000000", tmp_path / "tok")
    ids = theirs.encode(WORDS * 2 + "[SEP] team", add_special_tokens=False)
    assert len(ids) > 10 and ours.encode(WORDS) == theirs.encode(WORDS, add_special_tokens=False)
    for start in range(len(ids)):
        assert ours.decode(ids[start:]) == continuation(theirs, ids[start:]), ids[start:]


def tiny_gpt2(folder: Path, vocab: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(folder)


def test_an_imported_wordpiece_model_generates_the_text_transformers_gives(tmp_path):
    theirs = decoder_tokenizer(tmp_path / "src", "wordpiece")
    tiny_gpt2(tmp_path / "src", len(theirs))
    code, output = invoke("import", str(tmp_path / "src"), "-o", "run")
    assert code == 0, output
    code, output = invoke("generate", "run", "The sales team", "-s", "greedy", "-n", "8",
                          "--json")
    assert code == 0, output
    result = json.loads(output[output.index("{"):])["results"][0]  # after stderr's header
    assert result["text"] == continuation(theirs, result["token_ids"])
    # words, not pieces run together: every whole-word token (not a ##piece) follows a space
    words = sum(theirs.convert_ids_to_tokens(i).isalpha() for i in result["token_ids"])
    assert result["text"].count(" ") >= words, result
    stop = continuation(theirs, result["token_ids"][1:2])  # " team", say: it can now match
    code, output = invoke("generate", "run", "The sales team", "-s", "greedy", "-n", "8",
                          "--json", "--stop", stop)
    assert code == 0, output
    assert json.loads(output[output.index("{"):])["results"][0]["finish"] == "stop", output


@pytest.mark.parametrize(("decoder", "named"), [
    ("ctc", "CTC (it merges repeated tokens)"),
    ("replace-across-tokens", "Replace after ByteLevel or Fuse"),
    ("strip-after-byte-fallback", "Strip after ByteFallback"),
])
def test_decoders_that_act_across_tokens_are_refused_at_import_and_load(tmp_path, decoder,
                                                                        named):
    from llmcli.interop.tokenizer_store import HFTokenizer

    tiny_gpt2(tmp_path / "src", len(decoder_tokenizer(tmp_path / "src", decoder)))
    code, output = invoke("import", str(tmp_path / "src"), "-o", "run")
    assert code == 2 and output.count("\n") == 1, output
    assert named in output and "tokenizer.json" in output and "WordPiece" in output, output
    assert not Path("run").exists()
    with pytest.raises(UserError, match=re.escape(named)):  # a run an earlier version imported
        HFTokenizer("hf-0000000000000000", tmp_path / "src")


# ---------------------------------------------------------------------------------------------
# Biases


@pytest.mark.parametrize(("kind", "config", "stripped"), [
    ("llama", {"attention_bias": True}, "self_attn.o_proj.bias"),
    ("llama", {"attention_bias": True, "mlp_bias": True}, "self_attn.q_proj.bias"),
    ("llama", {"mlp_bias": True}, "mlp.down_proj.bias"),
    ("gpt2", {}, "attn.c_attn.bias"),
])
def test_biases_the_config_says_exist_must_be_in_the_checkpoint(tmp_path, kind, config, stripped):
    """A Llama with attention_bias (or mlp_bias) whose file lacks the biases was imported with
    zeros in their place, where transformers reports them missing."""
    from safetensors.torch import save_file

    source = hf_folder(tmp_path / "src", kind, **config)
    weights = load_file(source / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith(stripped)},
              source / "model.safetensors", metadata={"format": "pt"})
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 2 and output.splitlines()[-1].startswith("error:"), output  # after "reading"
    assert f"{stripped} is missing" in output.splitlines()[-1], output
    assert not Path("run").exists()


@pytest.mark.parametrize("kind, weight", [("gpt2", "transformer.h.1.ln_2.weight"),
                                          ("llama", "model.layers.0.self_attn.k_proj.weight")])
def test_weights_that_are_not_floats_are_refused_at_import(tmp_path, kind, weight):
    """Only the first tensor's dtype was checked: any other was cast to it (a Llama's k_proj
    of ints even unseen, by the concatenation with q_proj and v_proj)."""
    from safetensors.torch import save_file

    source = hf_folder(tmp_path / "src", kind)
    weights = load_file(source / "model.safetensors")
    weights[weight] = weights[weight].to(torch.int32)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 2, output
    assert output.splitlines()[-1] == (f"error: {source}: tensor {weight} is I32; expected a "
                                       "floating-point dtype (F32/BF16/F16); the file was "
                                       "altered or does not hold weights")
    assert not Path("run").exists()


def test_mixed_dtypes_are_imported_as_float32_and_said(tmp_path):
    """An fp16 embedding beside fp32 weights: every tensor was cast to the embedding's dtype,
    silently rounding the fp32 ones."""
    from safetensors.torch import save_file

    source = hf_folder(tmp_path / "src", "llama")
    weights = load_file(source / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].half()
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 0, output
    assert "(float32; the file mixes float16 and float32, each held exactly)" in output, output
    ours = load_file("run/step-00000000.safetensors")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert torch.equal(ours["tok_emb.weight"], weights["model.embed_tokens.weight"].float())
    assert torch.equal(ours["lm_head.weight"], weights["lm_head.weight"])
    weights = {k: v.to(torch.bfloat16 if "mlp" in k else torch.float16)
               for k, v in weights.items()}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    result = import_hf(str(source), Path("run2"))
    assert result.dtype == "float32" and result.stored == ["bfloat16", "float16"]
    ours = load_file(result.path)
    assert torch.equal(ours["blocks.0.ffn.fc_in.weight"],
                       weights["model.layers.0.mlp.up_proj.weight"].float())
    weights = {k: v.half() for k, v in weights.items()}  # one dtype: kept
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert import_hf(str(source), Path("run3")).dtype == "float16"


WRONG_SHAPES = {  # every tensor from_hf reshapes, transposes or concatenates, and the others
    "gpt2": [("transformer.h.0.attn.c_attn.weight", (32, 90), (32, 96)),
             ("transformer.h.0.attn.c_attn.weight", (96, 32), (32, 96)),  # not transposed
             ("transformer.h.0.attn.c_attn.weight", (96,), (32, 96)),
             ("transformer.h.1.mlp.c_fc.weight", (2, 32, 128), (32, 128)),
             ("transformer.h.1.mlp.c_proj.bias", (16,), (32,)),
             ("transformer.wpe.weight", (10, 32), (64, 32))],
    "llama": [("model.layers.0.self_attn.k_proj.weight", (16, 32), (32, 32)),
              ("model.layers.0.self_attn.q_proj.weight", (32, 16), (32, 32)),
              ("model.layers.0.self_attn.v_proj.weight", (32, 16), (32, 32)),
              ("model.layers.0.self_attn.q_proj.weight", (1024,), (32, 32)),
              ("model.layers.1.self_attn.k_proj.bias", (16,), (32,)),
              ("model.layers.0.mlp.up_proj.weight", (40, 32), (64, 32)),
              ("model.norm.weight", (), (32,))],
}


@pytest.mark.parametrize("kind", WRONG_SHAPES)
def test_wrongly_shaped_weights_are_one_line_naming_the_tensor_and_both_shapes(tmp_path, kind):
    """A Llama q/k/v or a GPT-2 Conv1D weight of the wrong shape failed inside the reshape,
    transpose or concatenation: "error: RuntimeError: shape '[4, 8, 16]' is invalid", exit 1."""
    from safetensors.torch import save_file

    source = hf_folder(tmp_path / "src", kind, **({"attention_bias": True} if kind == "llama"
                                                  else {}))
    weights = load_file(source / "model.safetensors")
    for name, shape, expected in WRONG_SHAPES[kind]:
        save_file({**weights, name: torch.zeros(shape)}, source / "model.safetensors",
                  metadata={"format": "pt"})
        code, output = invoke("import", str(source), "-o", "run")
        assert code == 2, output
        assert output.splitlines()[-1] == (
            f"error: {source}: weights do not match its config.json: {name} {shape} vs config "
            f"{expected}; the folder's config and weights are from different models"), output
        assert not Path("run").exists()


@pytest.mark.parametrize(("config", "which", "added"), [
    ({"attention_bias": True}, "feed-forward", 2 * (2 * 64 + 32)),  # gate, up, down per block
    ({"mlp_bias": True}, "attention output (o_proj)", 2 * 32),
])
def test_zero_biases_llm_adds_to_a_llama_are_counted_in_a_note(tmp_path, config, which, added):
    """A Llama with only attention_bias (or mlp_bias) printed more parameters than the source
    had, with no word of the zero biases llm's model.bias adds (it covers both)."""
    from transformers import AutoModelForCausalLM

    source = hf_folder(tmp_path / "src", "llama", **config)
    code, output = invoke("import", str(source), "-o", "run")
    assert code == 0, output
    theirs = AutoModelForCausalLM.from_pretrained(source).num_parameters()
    note = next(line for line in output.splitlines() if line.startswith("warning:"))
    assert f"{added:,} zero {which} biases were added ({theirs + added:,} parameters, the " \
        f"source {theirs:,})" in note, note
    assert f"parameters {theirs + added:,}" in output, output
