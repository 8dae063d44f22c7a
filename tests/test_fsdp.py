"""FSDP2 on 2 CPU processes (gloo): the same weights as one process on the same batches, one
consolidated checkpoint, exact resume, and resume across DDP / FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_train import markov_tokens, tiny_recipe, write_tokens

from llmcli.checkpoint import read_tensors, step_checkpoints, trainer_path

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost")


def recipe_dict(tokens: Path, **train) -> dict:
    keys = dict(max_iters=6, checkpoint_interval=3, eval_interval=3, grad_accum=2,
                grad_clip=0.5, weight_decay=0.1)
    raw = tiny_recipe(**{**keys, **train})
    raw["data"]["source"] = str(tokens)
    raw["model"].update(vocab_size="auto", dropout=0.0, tie_embeddings=True)
    return raw


WORKER = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    from test_fsdp import recipe_dict
    from llmcli.model.gpt import build_model
    from llmcli.pretrain import load_corpus, make_batches
    from llmcli.recipe import build_recipe
    from llmcli.train import distributed
    from llmcli.train.loop import train

    info, device = distributed.setup(torch.device("cpu"))
    tmp = Path({tmp!r})

    def run(name, resume=None, **train_keys):
        recipe, corpus = load_corpus(build_recipe(recipe_dict(Path({tokens!r}), **train_keys)))
        torch.manual_seed(1000 + info.rank)  # different weights: rank 0's must be used
        model = build_model(recipe.model)
        seen = []
        hook = model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
        result = train(recipe, model, make_batches(recipe, corpus, info.rank), tmp / name,
                       device=device, resume=resume)
        hook.remove()
        return result, seen

    a, _ = run("fsdp", parallel="fsdp")
    if info.is_main:
        (tmp / "resume-fsdp").mkdir()
        for suffix in ("", ".trainer"):
            name = f"step-00000003{{suffix}}.safetensors"
            shutil.copy(tmp / "fsdp" / name, tmp / "resume-fsdp" / name)
        shutil.copytree(tmp / "resume-fsdp", tmp / "resume-ddp")
    distributed.barrier(info)
    b, _ = run("resume-fsdp", tmp / "resume-fsdp" / "step-00000003.safetensors",
               parallel="fsdp")
    c, _ = run("resume-ddp", tmp / "resume-ddp" / "step-00000003.safetensors", parallel="ddp")
    d, _ = run("fsdp-ac", parallel="fsdp", activation_checkpointing=True, max_iters=3)
    e, seen = run("fsdp-bf16", parallel="fsdp", precision="bf16", max_iters=2)
    (tmp / f"rank{{info.rank}}.json").write_text(json.dumps({{
        "losses": {{k: r.losses for k, r in zip("abcde", (a, b, c, d, e))}},
        "bf16_inputs": sorted({{str(t) for t in seen}})}}))
    distributed.cleanup()
""")


class Combined:
    """One process's view of what 2 ranks draw: rank 0's rows, then rank 1's."""

    def __init__(self, sources) -> None:
        self.sources = sources
        self.tokens_per_batch = sum(s.tokens_per_batch for s in sources)

    def get_batch(self, split, purpose="train"):
        parts = [s.get_batch(split, purpose) for s in self.sources]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def reference(tokens: Path, run_dir: Path):
    """Single-process training on both ranks' batches at once."""
    from llmcli.model.gpt import build_model
    from llmcli.pretrain import load_corpus, make_batches
    from llmcli.recipe import build_recipe
    from llmcli.train.loop import train

    recipe, corpus = load_corpus(build_recipe(recipe_dict(tokens)))
    torch.manual_seed(1000)
    model = build_model(recipe.model)
    batches = Combined([make_batches(recipe, corpus, rank) for rank in (0, 1)])
    return train(recipe, model, batches, run_dir, device="cpu")


def assert_weights(a: Path, b: Path, atol: float) -> None:
    ta, tb = read_tensors(a), read_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype == torch.float32, name
        torch.testing.assert_close(ta[name], tb[name], atol=atol, rtol=0, msg=name)


def test_fsdp_matches_one_process_saves_one_file_and_resumes_exactly(tmp_path):
    # 47 ids: the embedding and output rows do not divide by 2 processes (FSDP pads them).
    tokens = write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000, vocab=47))
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), tokens=str(tokens),
                                    tmp=str(tmp_path)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # one loss, averaged across ranks
    losses = ranks[0]["losses"]

    ref = reference(tokens, tmp_path / "single")
    single = tmp_path / "single" / "step-00000006.safetensors"
    fsdp = tmp_path / "fsdp" / "step-00000006.safetensors"
    # The same training losses and (to float tolerance) the same weights and AdamW moments.
    for step, loss in ref.losses.items():
        assert losses["a"][str(step)] == pytest.approx(loss, abs=1e-5)
    assert_weights(single, fsdp, atol=1e-5)
    opt_single, opt_fsdp = read_tensors(trainer_path(single)), read_tensors(trainer_path(fsdp))
    moments = [k for k in opt_single if k.startswith("optim.")]
    assert moments and sorted(moments) == sorted(k for k in opt_fsdp if k.startswith("optim."))
    for key in moments:
        torch.testing.assert_close(opt_fsdp[key], opt_single[key], atol=1e-6, rtol=1e-4)

    # One consolidated checkpoint per step, written once, tied weights stored once as always.
    assert [s for s, _ in step_checkpoints(tmp_path / "fsdp")] == [3, 6]
    assert len({"tok_emb.weight", "lm_head.weight"} & set(read_tensors(fsdp))) == 1
    # Resumed from step 3 under FSDP: the uninterrupted run's weights, bit for bit.
    assert_weights(fsdp, tmp_path / "resume-fsdp" / "step-00000006.safetensors", atol=0)
    assert {k: losses["b"][k] for k in ("4", "5", "6")} == \
        {k: losses["a"][k] for k in ("4", "5", "6")}
    # Resumed under DDP from the FSDP checkpoint: the same run, to float tolerance.
    assert_weights(fsdp, tmp_path / "resume-ddp" / "step-00000006.safetensors", atol=1e-5)
    # Activation checkpointing recomputes the same numbers.
    assert_weights(tmp_path / "fsdp" / "step-00000003.safetensors",
                   tmp_path / "fsdp-ac" / "step-00000003.safetensors", atol=1e-6)
    # bf16 through FSDP's policy: blocks compute in bf16, weights stay fp32 in the file.
    assert ranks[0]["bf16_inputs"] == ["torch.bfloat16"]
    assert all(v == v for v in losses["e"].values())
    bf16 = read_tensors(tmp_path / "fsdp-bf16" / "step-00000002.safetensors")
    assert {t.dtype for t in bf16.values()} == {torch.float32}


def test_activation_checkpointing_gives_the_same_weights_in_one_process(tmp_path):
    from llmcli.model.gpt import build_model
    from llmcli.pretrain import load_corpus, make_batches
    from llmcli.recipe import build_recipe
    from llmcli.train.loop import train

    tokens = write_tokens(tmp_path / "corpus.tokens", markov_tokens(3000))
    runs = {}
    for ac in (False, True):
        raw = recipe_dict(tokens, activation_checkpointing=ac, max_iters=3)
        raw["model"]["dropout"] = 0.1  # the replayed RNG gives the same dropout masks
        recipe, corpus = load_corpus(build_recipe(raw))
        torch.manual_seed(0)
        model = build_model(recipe.model)
        result = train(recipe, model, make_batches(recipe, corpus), tmp_path / str(ac),
                       device="cpu")
        runs[ac] = result.losses
        assert "forward" not in vars(model.blocks[0])  # the model is handed back as it came
    assert runs[True] == runs[False]
    assert_weights(tmp_path / "False" / "step-00000003.safetensors",
                   tmp_path / "True" / "step-00000003.safetensors", atol=0)


# ---------------------------------------------------------------------------------------------
# Memory per device: when FSDP is needed (pure Python, no processes)

LLAMA_7B = ["model.d_model=4096", "model.num_blocks=32", "model.num_heads=32",
            "model.vocab_size=32000", "model.context_length=4096", "model.activation=swiglu",
            "model.norm=rmsnorm", "model.positions=rope"]


def test_memory_per_device_ddp_vs_fsdp_arithmetic():
    from llmcli.console import UserError
    from llmcli.scaling import device_memory, parse_bytes

    m = device_memory(1_000_000, 8, block=100_000, blocks=8, device_bytes=10**9)
    assert {k: m["ddp"][k] for k in ("weights", "gradients", "adamw", "working", "total")} == \
        {"weights": 4_000_000, "gradients": 4_000_000, "adamw": 8_000_000,
         "working": 4_000_000, "total": 20_000_000}
    # Sharded fp32 state / 8, plus bf16 copies of the root (200k) and two blocks, and the
    # unsharded gradients of the larger (bf16 + an fp32 copy for the reduce-scatter).
    assert {k: m["fsdp"][k] for k in ("weights", "gradients", "adamw", "working")} == \
        {"weights": 500_000, "gradients": 500_000, "adamw": 1_000_000,
         "working": 2 * (200_000 + 200_000) + 6 * 200_000}
    one = device_memory(1_000_000, 1, block=100_000, blocks=8)
    assert one["fsdp"] == one["ddp"] and one["ddp"]["working"] == 0
    assert device_memory(10**6, 4)["fsdp"]["working"] is None  # shape unknown: left out
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 2**29
    with pytest.raises(UserError, match="not a memory size"):
        parse_bytes("lots")


def test_params_and_scaling_say_when_fsdp_is_needed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcli.cli import app

    runner = CliRunner()
    monkeypatch.chdir(ROOT)
    scifi = runner.invoke(app, ["params", "recipes/scifi.yaml", "--nproc", "8", "--json"])
    assert scifi.exit_code == 0, scifi.output
    mem = json.loads(scifi.output)["device_memory"]
    assert mem["ddp"]["fits"] and mem["ddp"]["total"] == 20 * 140_573_600
    assert mem["verdict"].startswith("DDP fits")
    big = runner.invoke(app, ["params", "recipes/scifi.yaml", *LLAMA_7B, "--nproc", "8"])
    assert big.exit_code == 0, big.output
    text = " ".join(big.output.split())
    assert "memory per device with 8 process(es)" in text
    assert "DDP does not fit (" in text and " GiB > 80.0 GiB per device)" in text
    assert "FSDP over 8 processes does" in text and "use train.parallel=fsdp" in text
    # llm scaling counts the recipe by formula: the same figures.
    plan = runner.invoke(app, ["scaling", "--recipe", "recipes/scifi.yaml", "--num-gpus", "8",
                               "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["device_memory"] == mem
    shown = runner.invoke(app, ["scaling", "--params", "7B", "--num-gpus", "8",
                                "--device-memory", "80GB"])
    assert shown.exit_code == 0 and "left out" in shown.output and "FSDP" in shown.output
    bad = runner.invoke(app, ["params", "recipes/scifi.yaml", "--device-memory", "huge"])
    assert bad.exit_code == 2 and "not a memory size" in bad.output
