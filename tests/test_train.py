"""The shared training loop: learning, evaluation schedule, logs, checkpoints, failure modes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import markov_tokens, one_thread, tiny_recipe

from llmcli.checkpoint import (
    best_path,
    load_model,
    load_trainer_state,
    read_metadata,
    step_checkpoints,
    trainer_path,
)
from llmcli.console import UserError
from llmcli.data.batches import TokenWindows
from llmcli.model.gpt import build_model
from llmcli.model.loss import FusedLoss
from llmcli.recipe import build_recipe
from llmcli.train.loop import build_optimizer, train
from llmcli.train.metrics import read_metrics
from llmcli.train.schedule import lr_at

_threads = pytest.fixture(autouse=True)(one_thread)

TOKENS = markov_tokens(6000)


def setup(overrides=(), seed: int = 7, **train_kw):
    recipe = build_recipe(tiny_recipe(**train_kw), list(overrides))
    torch.manual_seed(seed)
    model = build_model(recipe.model)
    batches = TokenWindows(TOKENS, 5400, recipe.train.batch_size, recipe.model.context_length,
                           seed=recipe.train.seed)
    return recipe, model, batches


class CountingBatches:
    """Wraps a BatchSource and counts draws per split (to check the evaluation schedule)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []
        self.tokens_per_batch = inner.tokens_per_batch

    def get_batch(self, split, purpose="train"):
        self.calls.append(split if purpose == "train" else f"eval.{split}")
        return self.inner.get_batch(split, purpose)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    recipe, model, batches = setup(max_iters=60, eval_interval=20, checkpoint_interval=30,
                                   lr=1e-2)
    result = train(recipe, model, batches, tmp_path, device="cpu",
                   extra_meta={"tokenizer": "bytes"})
    assert result.step == 60
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["val"] < first["val"] - 1.0  # ln(64) ~ 4.16 falls well below 3.2
    assert [s for s, _ in step_checkpoints(tmp_path)] == [30, 60]
    assert trainer_path(tmp_path / "step-00000060.safetensors").exists()
    assert best_path(tmp_path).exists()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 20, 40, 60]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 61, 2))
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    meta = read_metadata(result.checkpoint)
    assert meta["step"] == 60 and meta["tokenizer"] == "bytes"
    assert meta["val_loss"] == pytest.approx(last["val"])
    assert meta["recipe"]["model"]["vocab_size"] == 64
    loaded, loaded_recipe, _, _ = load_model(result.checkpoint)
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p.detach(), q), n


def test_evaluation_schedule_uses_eval_interval_and_eval_iters(tmp_path):
    recipe, model, batches = setup(max_iters=10, eval_interval=4, eval_iters=3,
                                   checkpoint_interval=100)
    counting = CountingBatches(batches)
    result = train(recipe, model, counting, tmp_path, device="cpu")
    # evaluations at 0, 4, 8 and at the end (10), never every eval_iters steps (the seed's bug)
    assert [e["step"] for e in result.evals] == [0, 4, 8, 10]
    assert counting.calls.count("eval.val") == 4 * 3
    assert counting.calls.count("eval.train") == 4 * 3
    assert counting.calls.count("train") == 10  # evaluation never draws training batches
    assert counting.calls[:6] == ["eval.train"] * 3 + ["eval.val"] * 3  # train split, then val


def test_plain_log_lines_in_the_seed_format(tmp_path, capsys):
    recipe, model, batches = setup(max_iters=4, eval_interval=2)
    train(recipe, model, batches, tmp_path, device="cpu")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Step:")]
    assert len(lines) == 3
    assert re.fullmatch(r"Step: 0 Training Loss: \d+\.\d{1,3} Validation Loss: \d+\.\d{1,3}",
                        lines[0])
    assert re.fullmatch(r"Step: 2 Training Loss: \d+\.\d{1,3} Validation Loss: \d+\.\d{1,3}"
                        r" \| [\d,]+ tokens/s", lines[1])
    assert "\x1b[" not in "".join(lines)  # no colours or bars without a terminal


def test_keep_last_prunes_old_step_checkpoints(tmp_path):
    recipe, model, batches = setup(max_iters=10, checkpoint_interval=2, keep_last=2,
                                   eval_interval=5)
    train(recipe, model, batches, tmp_path, device="cpu")
    assert [s for s, _ in step_checkpoints(tmp_path)] == [8, 10]
    assert sorted(p.name for p in tmp_path.glob("*.trainer.safetensors")) == [
        "step-00000008.trainer.safetensors", "step-00000010.trainer.safetensors"]


def test_only_trainable_parameters_change_and_decay_hits_matrices_only(tmp_path):
    recipe, model, batches = setup(max_iters=3, checkpoint_interval=100)
    for name, p in model.named_parameters():
        if not name.startswith("blocks.1."):
            p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = []

    def save_weights(path, m, meta):
        saved.append((path.name, meta))
        from safetensors.torch import save_file

        from llmcli.files import atomic_path
        tensors = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "adapter"})

    train(recipe, model, batches, tmp_path, device="cpu", save_weights=save_weights,
          extra_meta={"template": "T"})
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == name.startswith("blocks.1."), name
    assert ("step-00000003.safetensors", saved[-1][1]) == saved[-1]
    assert saved[-1][1]["template"] == "T" and saved[-1][1]["step"] == 3
    tensors, _ = load_trainer_state(trainer_path(tmp_path / "step-00000003.safetensors"))
    assert {k for k in tensors if k.startswith("param.")} == {
        f"param.{n}" for n, p in model.named_parameters() if p.requires_grad}

    opt = build_optimizer(model, recipe.train, torch.device("cpu"))
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == recipe.train.weight_decay and rest["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in rest["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        p.requires_grad for p in model.parameters())


def nan_after(model, n):
    """Make the loss non-finite from the n-th training forward on (a hook keeps names)."""
    calls = [0]

    def hook(module, args, output):
        if module.training:
            calls[0] += 1
            if calls[0] >= n:
                return output * float("nan")
        return output

    model.norm.register_forward_hook(hook)  # the final norm: every training forward passes it
    return model


def test_non_finite_loss_stops_without_overwriting_checkpoints(tmp_path):
    recipe, model, batches = setup(max_iters=10, checkpoint_interval=2, eval_interval=100)
    with pytest.raises(UserError) as info:
        train(recipe, nan_after(model, 5), batches, tmp_path, device="cpu")
    message = str(info.value)
    assert info.value.exit_code == 1
    assert "nan at step 5" in message and "step-00000004.safetensors" in message
    assert "train.lr" in message
    assert [s for s, _ in step_checkpoints(tmp_path)] == [2, 4]
    loaded, _, meta, _ = load_model(tmp_path / "step-00000004.safetensors")
    assert meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


@pytest.mark.parametrize("settings, named, not_named", [
    ({}, ["train.lr=0.003"], ["grad_clip", "fp16", "weight_decay"]),
    ({"grad_clip": 0.0}, ["train.grad_clip=0"], ["fp16", "weight_decay"]),
    ({"lr": 10.0, "weight_decay": 10.0}, ["train.lr x train.weight_decay = 100", "by -99"],
     ["grad_clip", "fp16"]),
    ({"precision": "fp16"}, ["train.precision=fp16"], ["grad_clip", "weight_decay"]),
])
def test_a_diverged_run_names_only_the_causes_its_settings_make_likely(tmp_path, settings,
                                                                       named, not_named):
    """An fp32 run was told of "fp16 overflow (train.precision=fp32...)", and a clipped one
    of "no gradient clipping"."""
    recipe, model, batches = setup(max_iters=6, eval_interval=100, **settings)
    with pytest.raises(UserError) as info:
        train(recipe, nan_after(model, 2), batches, tmp_path, device="cpu")
    message = str(info.value)
    assert "training loss became nan at step 2" in message
    assert all(word in message for word in named), message
    assert not any(word in message for word in not_named), message


def nan_model(model):
    """Every forward, evaluation included, gives NaN: the untrained model is broken."""
    model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    return model


@pytest.mark.parametrize("settings, overrides, named, not_named", [
    ({"precision": "fp16"}, ["model.init_std=10"], ["model.init_std=10", "fp16"],
     ["train.lr", "grad_clip"]),
    ({}, ["model.init_std=10"], ["model.init_std=10"], ["fp16", "train.lr", "grad_clip"]),
    ({}, ["model.init=seed"], ["model.init=seed"], ["fp16", "init_std", "train.lr"]),
    ({}, [], ["model.init=gpt2, model.init_std=0.02"], ["fp16", "train.lr", "grad_clip"]),
])
def test_a_non_finite_step_0_evaluation_stops_there_and_diagnoses_the_start(
        tmp_path, capsys, settings, overrides, named, not_named):
    """It printed "Step: 0 Training Loss: nan" as a normal line, trained a step, and then
    blamed the learning rate and clipping, which had done nothing yet."""
    recipe, model, batches = setup(overrides, max_iters=6, eval_interval=2, **settings)
    with pytest.raises(UserError) as info:
        train(recipe, nan_model(model), batches, tmp_path, device="cpu")
    message = str(info.value)
    assert info.value.exit_code == 1
    assert "before any training is nan (step-0 evaluation)" in message
    assert all(word in message for word in named), message
    assert not any(word in message for word in not_named), message
    assert "Step: 0" not in capsys.readouterr().err
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # no run for a rerun to trip on
    assert not any(tmp_path.glob("*.safetensors"))


def test_a_non_finite_later_evaluation_stops_too(tmp_path):
    recipe, model, batches = setup(max_iters=6, eval_interval=2)
    calls = [0]

    def hook(module, args, output):
        calls[0] += not module.training
        return output * float("nan") if calls[0] > 4 else output  # step 0 evaluated 4 batches

    model.norm.register_forward_hook(hook)
    with pytest.raises(UserError, match="evaluation loss became nan at step 2"):
        train(recipe, model, batches, tmp_path, device="cpu")


def test_stops_on_max_tokens_with_a_final_evaluation_and_checkpoint(tmp_path):
    recipe, model, batches = setup(max_iters=100, max_tokens=5 * 4 * 16, eval_interval=50,
                                   checkpoint_interval=50)
    result = train(recipe, model, batches, tmp_path, device="cpu")
    assert result.step == 5 and result.tokens == 5 * 64
    assert result.stopped_by == "max_tokens"
    assert [e["step"] for e in result.evals] == [0, 5]
    assert [s for s, _ in step_checkpoints(tmp_path)] == [5]


def test_gradient_accumulation_counts_tokens_per_optimizer_step(tmp_path):
    recipe, model, batches = setup(max_iters=2, grad_accum=3, eval_interval=10)
    counting = CountingBatches(batches)
    result = train(recipe, model, counting, tmp_path, device="cpu")
    assert result.tokens == 2 * 3 * 64
    assert counting.calls.count("train") == 2 * 3  # 6 micro-steps
    assert counting.calls.count("eval.train") == 2 * 2  # 2 evaluations


def test_batches_without_targets_add_no_loss(tmp_path):
    """Fine-tuning batches may hold only prompt tokens (all IGNORE_INDEX): no NaN, no update."""
    recipe, model, batches = setup(max_iters=2, eval_interval=10, grad_clip=0.0,
                                   weight_decay=0.0)

    class Ignored(CountingBatches):
        def get_batch(self, split, purpose="train"):
            x, y = self.inner.get_batch(split, purpose)
            return x, torch.full_like(y, -100)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(recipe, model, Ignored(batches), tmp_path, device="cpu")
    assert all(v == 0.0 for v in result.losses.values())
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()), n


def test_cosine_schedule_warms_up_and_decays_to_the_floor():
    cfg = build_recipe({"train": {"lr": 1e-3, "lr_schedule": "cosine", "warmup_iters": 10,
                                  "min_lr": 1e-4, "max_iters": 110}}).train
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    constant = build_recipe({"train": {"lr": 2e-3}}).train
    assert {lr_at(s, constant) for s in (0, 5, 10_000)} == {2e-3}


def test_warmup_problem_says_when_the_peak_is_never_trained_at():
    from llmcli.train.schedule import warmup_problem

    def cfg(**train):
        return build_recipe({"train": {"lr": 1e-3, "max_iters": 10, **train}}).train

    assert warmup_problem(cfg(warmup_iters=9), 10) is None
    assert warmup_problem(cfg(warmup_iters=0), 10) is None
    at_end = warmup_problem(cfg(warmup_iters=10), 10)
    assert at_end is not None and "reaches train.lr only at its last step" in at_end
    short = warmup_problem(cfg(warmup_iters=40, lr_schedule="cosine"), 10)
    assert short is not None and "ends at 0.00025, below its peak train.lr=0.001" in short
    assert "cosine decay never starts" in short and "(train.max_iters)" in short
    tokens = warmup_problem(cfg(warmup_iters=5, max_tokens=256), 4)  # max_tokens ends it
    assert tokens is not None and "the run's 4 steps (train.max_tokens)" in tokens


def test_tensorboard_missing_is_a_warning_not_a_failure(tmp_path, capsys):
    recipe, model, batches = setup(max_iters=2, tracker="tensorboard", eval_interval=10)
    train(recipe, model, batches, tmp_path, device="cpu")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard package is not installed" in capsys.readouterr().err
    else:
        assert any((tmp_path / "tensorboard").iterdir())
    assert read_metrics(tmp_path / "metrics.jsonl")


def test_tensorboard_drops_the_events_after_a_resumed_step(tmp_path, monkeypatch):
    """A resume (or a branch from an older step) starts the event writer with purge_step, so
    TensorBoard drops the abandoned steps' scalars as metrics.jsonl drops their records."""
    from llmcli.train import metrics

    opened = []
    monkeypatch.setattr(metrics, "_tensorboard",
                        lambda folder, purge_step: opened.append((folder.name, purge_step)))
    for step in (0, 40):
        metrics.Metrics(tmp_path, tracker="tensorboard").start(step)
    metrics.Metrics(tmp_path, enabled=False, tracker="tensorboard").start(40)  # not rank 0
    assert opened == [("tensorboard", None), ("tensorboard", 41)]


def test_metrics_jsonl_is_plain_json_lines(tmp_path):
    recipe, model, batches = setup(max_iters=2, eval_interval=1)
    train(recipe, model, batches, tmp_path, device="cpu")
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["kind"] in ("train", "eval") and isinstance(record["step"], int)
    assert np.isfinite([r.get("val", 0) for r in read_metrics(tmp_path / "metrics.jsonl")]).all()


@pytest.mark.parametrize("bias", [True, False])
def test_fused_output_layer_and_loss_match_the_textbook_path(bias):
    from llmcli.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    b = (torch.randn(50) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, 50, (24,))
    t[::5] = -100  # ignored positions (prompt tokens)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, b), t,
                                            ignore_index=-100)
    (ref * 3).backward()  # a non-unit upstream gradient (grad_accum scales the loss)
    expected = [p.grad.clone() for p in (x, w, b) if p is not None]
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    got = linear_cross_entropy(x, w, b, t)
    (got * 3).backward()
    assert torch.allclose(got, ref, atol=1e-6)
    for e, p in zip(expected, [p for p in (x, w, b) if p is not None], strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, b, t), ref, atol=1e-6)
    nothing = linear_cross_entropy(x, w, b, torch.full_like(t, -100))
    assert nothing.item() == 0.0


def test_fused_loss_when_the_target_probability_underflows():
    """A target 200 nats below the best logit: p(target) is 0 in fp32, the loss is still exact."""
    from llmcli.model.loss import linear_cross_entropy

    x = torch.eye(4, 8)
    w = torch.zeros(6, 8)
    w[0, :4] = 100.0  # logit 100 for id 0 on every row
    w[5, :4] = -100.0  # logit -100 for id 5
    t = torch.tensor([5, 5, 1, 0])
    ref = torch.nn.functional.cross_entropy(x @ w.t(), t)
    got = linear_cross_entropy(x, w.requires_grad_(), None, t)
    assert torch.isfinite(got) and torch.allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_loss_under_bf16_autocast_matches_autocasts_own_path(bias):
    """bf16 logits and gradients, fp32 loss: as close to fp32 arithmetic as autocast's own
    linear -> cross_entropy path is."""
    from llmcli.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(40, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.3).requires_grad_()
    b = (torch.randn(300) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, 300, (40,))
    t[::7] = -100
    params = [p for p in (x, w, b) if p is not None]

    def run(fn, autocast):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        return loss, [p.grad.clone() for p in params]

    def textbook():
        logits = torch.nn.functional.linear(x, w, b).float()
        return torch.nn.functional.cross_entropy(logits, t, ignore_index=-100)

    exact, exact_grads = run(textbook, False)
    auto, auto_grads = run(textbook, True)
    got, got_grads = run(lambda: linear_cross_entropy(x, w, b, t), True)
    assert got.dtype == torch.float32
    assert abs(got.item() - auto.item()) < 2e-3  # same bf16 logits; p(max) rounded to bf16
    for e, a, g in zip(exact_grads, auto_grads, got_grads, strict=True):
        assert g.dtype == torch.float32
        auto_error = (a - e).abs().max().item()
        assert (g - e).abs().max().item() <= 2 * auto_error + 1e-6


def test_model_fused_loss_equals_the_logits_loss(tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    idx = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, targets)
    none, fused = FusedLoss(model)(idx, targets)
    assert none is None and logits.shape == (3, 16, 64)
    assert torch.allclose(loss, fused, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    recipe, model, batches = setup(max_iters=3, eval_interval=3, precision=precision)
    result = train(recipe, model, batches, tmp_path, device="cpu")
    assert result.step == 3 and all(np.isfinite(list(result.losses.values())))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    meta = read_metadata(result.checkpoint)
    assert meta["recipe"]["train"]["precision"] == precision


def test_fused_loss_workspace_is_safe_across_calls():
    """The logits buffer is reused: a second forward must not corrupt the first's gradients."""
    from llmcli.model.loss import linear_cross_entropy

    torch.manual_seed(1)
    w = torch.randn(40, 8, requires_grad=True)
    x1, x2 = torch.randn(12, 8, requires_grad=True), torch.randn(12, 8)
    t1, t2 = torch.randint(0, 40, (12,)), torch.randint(0, 40, (12,))
    first = linear_cross_entropy(x1, w, None, t1)
    linear_cross_entropy(x2, w, None, t2)  # overwrites the shared buffer
    first.backward()
    got = (x1.grad.clone(), w.grad.clone())
    x1.grad = w.grad = None
    torch.nn.functional.cross_entropy(x1 @ w.t(), t1).backward()
    assert torch.allclose(got[0], x1.grad, atol=1e-6) and torch.allclose(got[1], w.grad,
                                                                         atol=1e-6)


def test_evaluating_more_or_less_often_never_changes_the_training(tmp_path):
    """Evaluation draws from its own random streams, so eval_interval cannot move the weights."""
    finals = []
    for interval in (7, 10):
        recipe, model, batches = setup(max_iters=20, eval_interval=interval,
                                       checkpoint_interval=100)
        train(recipe, model, batches, tmp_path / str(interval), device="cpu")
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), name


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_compiled_forward_runs_the_fused_loss_as_written(precision):
    """torch.compile runs the hand-fused loss as written: the same loss and gradients as eager,
    and no attempt to trace its backward (which broke at the upstream gradient's value, with a
    warning on every run)."""
    from llmcli.model.loss import linear_cross_entropy

    torch.manual_seed(2)
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (12,))

    def loss_and_grads(fn):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            loss = fn(torch.tanh(x), w, None, t)
        loss.backward()
        return loss.detach(), x.grad.clone(), w.grad.clone()

    torch._dynamo.reset()
    got = loss_and_grads(torch.compile(linear_cross_entropy, backend="eager"))
    assert all(torch.equal(a, b) for a, b in zip(got, loss_and_grads(linear_cross_entropy),
                                                  strict=True))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
        explained = torch._dynamo.explain(linear_cross_entropy)(torch.tanh(x), w, None, t)
    torch._dynamo.reset()
    assert not [r for r in explained.break_reasons if "item()" in str(r.reason)]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, mode):
    from llmcli.train.loop import Trainer

    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: seen.append((net, kw)) or net)
    recipe, model, batches = setup([f"train.compile_mode={mode}"], compile=True)
    try:
        net = Trainer(recipe, model, batches, tmp_path, torch.device("cpu"), None,
                      None).training_net()
    finally:
        torch.use_deterministic_algorithms(False)  # what compiling on the CPU turns on
    assert isinstance(net, FusedLoss) and seen == [(net, {"mode": None if mode == "default"
                                                          else mode})]
    plain = setup([f"train.compile_mode={mode}"])
    Trainer(*plain, tmp_path / "plain", torch.device("cpu"), None, None).training_net()
    assert len(seen) == 1  # compile: false ignores the mode


def test_cpu_kernels_are_compiled_deterministic(tmp_path, monkeypatch):
    """Two compiled CPU runs with the same seed differed by 1e-7 (inductor's multi-threaded
    atomic adds), so `--resume` of a compiled run was not exact. (Compiling for real takes a
    minute here: the real runs were compared by hand, bit-identical once deterministic.)"""
    from llmcli.train.loop import Trainer

    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: seen.append(
        torch.are_deterministic_algorithms_enabled()) or net)
    torch.use_deterministic_algorithms(False)
    try:
        Trainer(*setup([], compile=True), tmp_path, torch.device("cpu"), None,
                None).training_net()
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [True]


def test_an_unknown_compile_mode_is_a_one_line_error():
    with pytest.raises(UserError, match=r"train\.compile_mode.*reduce-overhead"):
        build_recipe(tiny_recipe(), ["train.compile_mode=fastest"])


def adapted(overrides=()):
    """The tiny model, with the recipe's LoRA layers when it asks for them."""
    from llmcli.model.lora import apply_lora

    recipe, model, _ = setup(overrides)
    if recipe.lora.rank:
        apply_lora(model, recipe.lora)
    return model


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("model_overrides", [
    (),
    ("model.positions=learned", "model.activation=gelu", "model.tie_embeddings=true"),
    ("model.positions=rope", "model.norm=rmsnorm", "model.activation=swiglu", "lora.rank=4",
     "lora.targets=[qkv,proj,ffn_in,ffn_out,head]"),
])
def test_compiled_training_forward_breaks_only_at_the_fused_loss(precision, model_overrides):
    """The blocks compile as one graph: a break inside them (the CPU dropout mask once made
    one per dropout) costs speed and, replayed from torch's compile cache in a later run,
    crashed training (a corrupt view after the break, torch 2.13)."""
    net = FusedLoss(adapted(model_overrides)).train()
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
        explained = torch._dynamo.explain(net)(x, y)
    torch._dynamo.reset()
    assert explained.graph_count >= 1
    assert {Path(r.user_stack[-1].filename).name for r in explained.break_reasons} <= {"loss.py"}


def test_mean_cross_entropy_is_zero_not_nan_without_targets():
    from llmcli.model.loss import mean_cross_entropy

    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = -100
    want = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1))
    assert torch.allclose(mean_cross_entropy(logits, targets), want, atol=1e-6)
    none = mean_cross_entropy(logits, torch.full_like(targets, -100))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("overrides", [(), ("lora.rank=4", "lora.targets=[head]")])
def test_the_training_forward_returns_no_logits(overrides):
    """Under torch.compile a returned output that backward does not use still gets a gradient:
    a zero-filled tensor the size of the logits, every step. Fused or not (an adapted output
    layer is not), the training forward returns the loss alone."""
    model = adapted(overrides).eval()  # no dropout: the two paths see the same activations
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    logits, loss = FusedLoss(model)(x, y)
    assert logits is None and torch.allclose(loss, model(x, y)[1], atol=1e-6)
    torch._dynamo.reset()
    net = torch.compile(FusedLoss(model), backend="aot_eager")
    net(x, y)[1].backward()
    with torch.profiler.profile(record_shapes=True) as prof:
        net(x, y)[1].backward()
    torch._dynamo.reset()
    fills = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True)
             if e.key in ("aten::fill_", "aten::zero_")]
    assert [2, 16, 64] not in [shape[0] for shape in fills if shape]
