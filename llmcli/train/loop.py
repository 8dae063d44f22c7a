"""One training loop for pretraining and fine-tuning.

Interface (stable: `llm pretrain` and `llm finetune` both build on it):

    train(recipe, model, batches, run_dir, *, device, resume=None, save_weights=None,
          extra_meta=None, base=None, before_start=None) -> TrainResult

- `batches`: a `llmcli.data.batches.BatchSource`: `get_batch(split) -> (x, y)` int64 CPU
  tensors (B, T), y = IGNORE_INDEX (-100) where no loss is wanted; `state_dict()` and
  `load_state_dict(state)` (tensors) for exact resume; `tokens_per_batch`. State keys with an
  `eval.` part (`rng.eval.val`) are evaluation's: only scheduled evaluations advance them.
- Trains only parameters with `requires_grad` (LoRA freezes the rest); AdamW's decoupled weight
  decay applies to parameters with 2 or more dimensions only.
- Checkpoints (`step-N.safetensors` + `step-N.trainer.safetensors`, `best.safetensors`) go
  through `save_weights(path, model, meta)` when given (LoRA: adapters only), else
  `save_model(path, model, recipe, **meta)`; `meta` holds `extra_meta` ("tokenizer",
  "vocab_map", "template", ...) plus "step", "train_loss" and "val_loss".
- `resume`: a step checkpoint with its trainer state beside it. Without `save_weights` the
  weights come from the checkpoint; with it, the trainable parameters come from the trainer
  state (which then stores them), so LoRA runs resume over the same frozen base.
- `base`: the checkpoint a fine-tune's weights came from (None: the recipe's init), named when
  the untrained model's loss is not finite.
- `before_start()`: called on every process once the trainer is set up (and a resume restored),
  before anything is written to `run_dir`: the run directory's claim clears the earlier run
  there only then (`llmcli.checkpoint.RunClaim.start`), so a run refused on its set-up
  leaves it whole.
- Ctrl-C finishes the step, saves and raises `TrainingInterrupted` (exit 130); a non-finite loss
  (training, or any evaluation, the one at step 0 included) raises a `UserError` (exit 1)
  without touching the checkpoints already written.
- Under torchrun or srun (see `distributed.py`) the model is wrapped in DDP, or sharded with
  FSDP2 when `train.parallel` is fsdp (weights, gradients and AdamW moments split across the
  processes; bf16 through FSDP's mixed-precision policy instead of autocast). Only global rank 0
  prints and writes; under FSDP every rank takes part in gathering the full weights and
  optimizer state it writes, so checkpoints and trainer states have one format whichever way a
  run was trained, and a run can resume under the other mode or another process count.

Per-step data access, model building and recipe-specific set-up stay in the callers
(`llmcli/pretrain.py`, `llmcli/finetune.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcli.checkpoint import (
    best_path,
    dependents,
    load_tensors,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    save_model,
    save_trainer_state,
    step_path,
    trainer_path,
    unwrap,
)
from llmcli.console import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    UserError,
    err,
    fail,
    first_line,
    info,
    warn,
)
from llmcli.constants import IGNORE_INDEX
from llmcli.data.batches import BatchSource
from llmcli.hardware import peak_flops
from llmcli.recipe import ModelConfig, Recipe, TrainConfig
from llmcli.train import distributed, state
from llmcli.train.allocator import keep_freed_memory
from llmcli.train.metrics import Metrics
from llmcli.train.precision import (
    Precision,
    check_sharded_precision,
    enable_fast_matmul,
    resolve_precision,
)
from llmcli.train.schedule import lr_at, total_steps, warmup_problem

SaveWeights = Callable[[Path, Any, dict], None]
DEFAULT_INIT_STD: float = ModelConfig.init_std


@dataclass
class TrainResult:
    step: int  # the last optimizer step completed
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (this call)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "train", "val"}
    best_val: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None  # the last step checkpoint written
    tokens: int = 0  # training tokens seen (all ranks, resumed runs included)
    elapsed: float = 0.0  # training seconds (resumed runs included)
    stopped_by: str = "max_iters"  # max_iters | max_tokens | max_time | interrupted

    @property
    def val_loss(self) -> float | None:
        return self.evals[-1]["val"] if self.evals else None

    @property
    def train_loss(self) -> float | None:
        return self.evals[-1]["train"] if self.evals else None


class EvaluationAbandoned(Exception):
    """Ctrl-C during an evaluation: its numbers are dropped and the run saves and stops."""


class TrainingInterrupted(UserError):
    """Ctrl-C: the step finished and the checkpoint was saved; the command exits with 130."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message, EXIT_INTERRUPTED)
        self.result = result


# ---------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on matrices (not biases, norms)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        fail("nothing to train: every parameter is frozen (check the lora section)")
    decay = [p for _, p in named if p.dim() >= 2]
    rest = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    # fused: one kernel per step on CUDA and a vectorised loop on CPU (torch >= 2.4).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


class _StopFlag:
    """First Ctrl-C (or SIGTERM, as schedulers and torchrun send): finish the step and save.

    Another one a second later aborts at once; within that second it is the same keypress
    reaching us twice (from the terminal and from torchrun), so it is ignored.
    """

    def __init__(self) -> None:
        self.requested_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested_at is not None and now - self.requested_at > 1.0:
            raise KeyboardInterrupt
        if self.requested_at is None:
            self.requested_at = now
            if distributed.from_env().rank == 0:  # each rank hears the keypress: one says so
                err.print("\nstopping: finishing this step (an evaluation is dropped) to save "
                          "a checkpoint (Ctrl-C again to abort without saving)", style="yellow")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Trainer:
    """The state of one run; `train()` below is the public entry point."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, batches: BatchSource,
                 run_dir: Path, device: torch.device, save_weights: SaveWeights | None,
                 extra_meta: dict | None, base: Path | None = None) -> None:
        self.recipe = recipe
        self.base = base
        self.cfg = recipe.train
        self.batches = batches
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.save_weights = save_weights
        self.extra_meta = dict(extra_meta or {})
        self.dist = distributed.current()
        self.main = self.dist.is_main

        self.raw = unwrap(model).to(self.device)
        enable_fast_matmul(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.precision: Precision = resolve_precision(self.cfg.precision, self.device)
        # FSDP needs a process group: several processes (one process trains plainly whatever
        # the recipe says), or one whose caller set a group up itself (a one-GPU FSDP check).
        self.fsdp = self.cfg.parallel == "fsdp" and (self.dist.enabled or distributed.joined())
        check_sharded_precision(self.precision.name, self.fsdp)
        self.scaler = self.precision.scaler()
        self.optimizer = build_optimizer(self.raw, self.cfg, self.device)
        self.trainable = [p for p in self.raw.parameters() if p.requires_grad]
        self.checkpointed: list[torch.nn.Module] = []

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self._told_best_kept = False
        self.last_val: float | None = None
        self.last_eval_train: float | None = None
        self.result = TrainResult(step=0)
        self.eval_overflowed = False
        self.stop = _StopFlag()
        self.metrics = Metrics(self.run_dir, enabled=self.main, tracker=self.cfg.tracker)
        self.tokens_per_step = batches.tokens_per_batch * self.cfg.grad_accum * self.dist.world_size
        self.total = total_steps(self.cfg, self.tokens_per_step)
        self.flops_per_token = _flops_per_token(self.raw, recipe)
        self.peak = peak_flops(self.device, self.precision.name) if self.main else None

    # -- set-up ---------------------------------------------------------------------------

    def restore_weights(self, resume: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """The weights of a step checkpoint, into the plain model (before DDP or FSDP wraps it);
        returns the trainer state for `restore`."""
        tensors, meta = load_trainer_state(trainer_path(resume))
        if self.save_weights is None:
            load_weights(self.raw, resume)
        else:
            load_tensors(self.raw, state.unprefixed(tensors, "param."), str(resume), strict=False)
        return tensors, meta

    def restore(self, resume: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Everything but the weights: optimizer, scaler, RNG and sampler streams, counters."""
        where, held = str(resume), str(trainer_path(resume))
        # The moments continue; the hyper-parameters are the recipe's (it may have changed):
        # the optimizer's own groups are loaded with them (`state.optimizer_state_dict`).
        if self.fsdp:
            indexed = state.optimizer_state_dict(self.optimizer, tensors, meta["optimizer"],
                                                 held)
            distributed.load_full_optimizer_state(self.raw, self.optimizer, indexed)
        else:
            state.load_optimizer_state(self.optimizer, tensors, meta["optimizer"], held)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        rank_prefix = f"rank{self.dist.rank}."
        ranked = state.unprefixed(tensors, rank_prefix)
        saved_world = meta.get("world_size")
        if ranked:
            try:
                state.set_rng_state(ranked, meta["rng"][str(self.dist.rank)])
            except (RuntimeError, ValueError) as exc:  # the sizes were checked, not the bytes
                fail(f"{held}: trainer state holds random states of rank {self.dist.rank} that "
                     f"cannot be restored ({first_line(exc)}); the file was altered: resume "
                     "from another checkpoint of the run")
            try:
                self.batches.load_state_dict(state.unprefixed(ranked, "batches."))
            except ValueError as exc:  # other data or another kind of run: say so, no crash
                fail(f"--resume {where}: {exc}")
        else:  # a rank the saved run did not have: a fresh stream of its own
            state.seed_everything(self.cfg.seed + self.dist.rank + 1_000_003 * meta["step"])
        if self.main and isinstance(saved_world, int) and saved_world != self.dist.world_size:
            self.note_world_change(where, saved_world)
        saved_total = meta.get("total_steps")
        if (self.main and self.cfg.lr_schedule != "constant" and isinstance(saved_total, int)
                and saved_total != self.total):
            warn(f"{where} was trained toward {saved_total:,} steps and this run goes to "
                 f"{self.total:,}: the {self.cfg.lr_schedule} learning-rate schedule changes "
                 "from here on (set train.max_iters / max_tokens as before to keep it)")
        self.step = int(meta["step"])
        self.tokens = int(meta.get("tokens", 0))
        self.elapsed = float(meta.get("elapsed", 0.0))
        self.best_val = meta.get("best_val")
        self.best_step = meta.get("best_step")
        self.last_val = meta.get("val_loss")
        self.last_eval_train = meta.get("train_loss")
        self.result.evals = list(meta.get("evals", []))
        if self.step >= self.total and self.main:
            info(f"{where} is already at step {self.step} of {self.total}; raise "
                 "train.max_iters to train further")

    def note_world_change(self, where: str, saved: int) -> None:
        """What stays exact when a run resumes on another number of processes, and what not."""
        info(world_change_note(where, saved, self.dist.world_size))

    def parallelize(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model the training steps call, the one evaluation calls): activation
        checkpointing, then DDP around the training net or FSDP2 sharding it in place (after
        which the optimizer is rebuilt over the sharded parameters)."""
        blocks = list(getattr(self.raw, "blocks", []))
        if self.cfg.activation_checkpointing:
            self.checkpointed = distributed.activation_checkpointing(blocks)
        if not self.fsdp:
            net = self.training_net()
            return distributed.wrap(net, self.dist, self.device), net
        from llmcli.model.loss import FusedLoss

        net = FusedLoss(self.raw) if hasattr(self.raw, "hidden") else self.raw
        param_dtype = self.precision.dtype
        distributed.fully_shard_model(net, blocks, self.dist, self.device, param_dtype)
        # bf16 now comes from the sharding policy (weights cast once per gather): no autocast.
        self.precision = dataclasses.replace(self.precision, dtype=None)
        self.optimizer = build_optimizer(self.raw, self.cfg, self.device)
        self.trainable = [p for p in self.raw.parameters() if p.requires_grad]
        net = self.compiled(net)
        return net, net

    def training_net(self) -> torch.nn.Module:
        """The model as training calls it: the fused output layer + loss where it applies,
        compiled when the recipe asks."""
        from llmcli.model.loss import FusedLoss

        net = FusedLoss(self.raw) if hasattr(self.raw, "hidden") else self.raw
        return self.compiled(net)

    def compiled(self, net: torch.nn.Module) -> torch.nn.Module:
        """`net` under torch.compile in the recipe's mode, when the recipe asks. On the CPU the
        compiled kernels are made deterministic: their multi-threaded gradient sums (atomic
        adds) differed from run to run by 1e-7, so a run and its resume were no longer equal
        bit for bit, as eager ones are. (It stays on for the process: a later compile in it
        must agree.)"""
        if not self.cfg.compile:
            return net
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        mode = self.cfg.compile_mode
        return torch.compile(net, mode=None if mode == "default" else mode)

    # -- one step -------------------------------------------------------------------------

    def train_step(self, model: torch.nn.Module) -> torch.Tensor:
        lr = lr_at(self.step, self.cfg, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        accum = self.cfg.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.batches.get_batch("train")
            has_targets = bool((y != IGNORE_INDEX).any())
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            last = micro == accum - 1
            with distributed.gradient_sync(model, last or not self.dist.enabled):
                with self.precision.autocast():
                    logits, loss = model(x, y)
                if not has_targets and logits is not None:
                    loss = logits.float().sum() * 0.0  # not NaN: a zero that keeps DDP in step
                loss = loss / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach().float()
        if self.cfg.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, view: _View | None = None) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, averaged across ranks.

        A Ctrl-C abandons it after the current batch (`EvaluationAbandoned`) in a single
        process; under DDP every rank must reach the final reduction, so it finishes.
        """
        model.eval()
        means = []
        overflow = 0.0  # a scored batch whose loss is not finite (a split scoring none is NaN)
        done, total_batches = 0, 2 * self.cfg.eval_iters
        try:
            for split in ("train", "val"):
                total, count = 0.0, 0
                for _ in range(self.cfg.eval_iters):
                    if self.stop.requested and not self.dist.enabled:
                        raise EvaluationAbandoned
                    if view is not None:
                        view.phase(f"eval {done}/{total_batches}")
                    done += 1
                    x, y = self.batches.get_batch(split, "eval")
                    scored = bool((y != IGNORE_INDEX).any())
                    if not scored and not self.fsdp:  # under FSDP every forward is collective
                        continue
                    with self.precision.autocast():
                        _, loss = model(x.to(self.device), y.to(self.device))
                    if scored:
                        total += float(loss)
                        count += 1
                        overflow = max(overflow, float(not math.isfinite(float(loss))))
                means.append(total / count if count else float("nan"))
        finally:
            model.train()
            if view is not None:
                view.phase("train")
        reduced = distributed.mean_across(torch.tensor([*means, overflow], dtype=torch.float64),
                                          self.dist)
        self.eval_overflowed = bool(reduced[2] > 0)  # every rank decides alike
        return {"train": float(reduced[0]), "val": float(reduced[1])}

    # -- checkpoints ----------------------------------------------------------------------

    def weights_meta(self) -> dict[str, Any]:
        return {**self.extra_meta, "step": self.step, "train_loss": self.last_eval_train,
                "val_loss": self.last_val}

    def weights_to_save(self) -> Any:
        """What the checkpoint writers read: the model, or under FSDP its full weights gathered
        onto rank 0 (a collective: every rank calls this; None on the others)."""
        if not self.fsdp:
            return self.raw if self.main else None
        full = distributed.full_model_state(self.raw)
        return distributed.FullWeights(full) if self.main else None

    def write_weights(self, path: Path, weights: Any = None, **extra: Any) -> None:
        """Every rank calls this; rank 0 writes (`extra`: more metadata)."""
        weights = self.weights_to_save() if weights is None else weights
        if not self.main:
            return
        meta = {**self.weights_meta(), **extra}
        if self.save_weights is not None:
            self.save_weights(path, weights, meta)
        else:
            save_model(path, weights, self.recipe, **meta)

    def save(self) -> Path:
        """Trainer state first, then the weights: a step file always has its state beside it,
        and a state whose weights could not be written goes. Both carry one `save_id`, so a
        resume can tell that they were saved together."""
        path = step_path(self.run_dir, self.step)
        save_id = uuid.uuid4().hex
        rng_tensors, rng_meta = state.rng_state()
        ranked = {**rng_tensors, **state.prefixed(self.batches.state_dict(), "batches.")}
        gathered = distributed.gather_objects((ranked, rng_meta), self.dist)
        weights = self.weights_to_save()
        full_optimizer = (distributed.full_optimizer_state(self.raw, self.optimizer)
                          if self.fsdp else None)
        if self.main:
            tensors, opt_meta = state.optimizer_state(self.optimizer, full_optimizer)
            for rank, (rank_tensors, _) in enumerate(gathered):
                tensors.update(state.prefixed(rank_tensors, f"rank{rank}."))
            if self.save_weights is not None:
                values = dict(weights.named_parameters())
                tensors.update({f"param.{n}": values[n]
                                for n, p in self.raw.named_parameters() if p.requires_grad})
            meta = {
                "step": self.step, "total_steps": self.total, "tokens": self.tokens,
                "elapsed": self.elapsed,
                "best_val": self.best_val, "best_step": self.best_step,
                "val_loss": self.last_val, "train_loss": self.last_eval_train,
                "evals": self.result.evals, "world_size": self.dist.world_size,
                "parallel": "fsdp" if self.fsdp else ("ddp" if self.dist.enabled else "none"),
                "optimizer": opt_meta, "rng": {str(r): m for r, (_, m) in enumerate(gathered)},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "recipe": {"name": self.recipe.name, **self.recipe.to_dict()},
                "save_id": save_id,
            }
            save_trainer_state(trainer_path(path), tensors, meta)
            try:
                self.write_weights(path, weights, save_id=save_id)
            except BaseException:  # a full disk, Ctrl-C: no trainer state without its weights
                trainer_path(path).unlink(missing_ok=True)
                raise
            prune_checkpoints(self.run_dir, self.cfg.keep_last)
        distributed.barrier(self.dist)
        self.result.checkpoint = path
        return path

    # -- the loop -------------------------------------------------------------------------

    def run(self, resume: Path | None,
            before_start: Callable[[], None] | None = None) -> TrainResult:
        check_same_run(self.recipe, self.extra_meta, self.dist)
        saved = self.restore_weights(Path(resume)) if resume is not None else None
        model, net = self.parallelize()
        try:
            return self._run(model, net, resume, saved, before_start)
        finally:
            distributed.undo_activation_checkpointing(self.checkpointed)

    def _run(self, model: torch.nn.Module, net: torch.nn.Module, resume: Path | None,
             saved: tuple[dict[str, torch.Tensor], dict] | None,
             before_start: Callable[[], None] | None = None) -> TrainResult:
        if resume is not None and saved is not None:
            self.restore(Path(resume), *saved)
        else:
            state.seed_everything(self.cfg.seed + self.dist.rank)
        if before_start is not None:
            before_start()
        start = self.step
        eval_streams = _eval_part(self.batches.state_dict())
        problem = warmup_problem(self.cfg, self.total)
        if problem and self.main:
            warn(problem)
        self.metrics.start(start)
        model.train()
        stop = self.stop
        view = _View(self)
        stopped_by = None
        interrupted = False
        window_time, window_tokens = 0.0, 0
        try:
            with stop.installed(), view:
                while True:
                    # Order at each step: evaluate, checkpoint, stop or train. A resumed run
                    # restarts here and skips what the saved run already did at this step.
                    stopped_by = self.stop_reason()
                    done = stopped_by is not None
                    evaluated = {e["step"] for e in self.result.evals}
                    scheduled = self.step % self.cfg.eval_interval == 0
                    if (scheduled or done) and self.step not in evaluated and not interrupted:
                        try:
                            self.record_eval(net, view)
                        except EvaluationAbandoned:
                            interrupted = True
                        # Only scheduled evaluations advance the evaluation streams: one at a
                        # stop (or one abandoned) draws nothing a resumed run would miss.
                        if scheduled and not interrupted:
                            eval_streams = _eval_part(self.batches.state_dict())
                        else:
                            self.batches.load_state_dict(
                                {**self.batches.state_dict(), **eval_streams})
                    if self.step > start and (
                            self.step % self.cfg.checkpoint_interval == 0 or done or interrupted):
                        view.phase("saving")
                        self.save()
                        view.phase("train")
                    if done or interrupted:
                        break

                    t0 = time.perf_counter()
                    loss_t = self.train_step(model)
                    flags = torch.stack([loss_t.float().cpu(),
                                         torch.tensor(float(stop.requested))])
                    flags = distributed.mean_across(flags, self.dist)
                    loss = float(flags[0])
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    self.elapsed += dt
                    window_time += dt
                    window_tokens += self.tokens_per_step
                    if not math.isfinite(loss):
                        self.non_finite(loss)
                    self.result.losses[self.step] = loss
                    view.step(loss)
                    if self.step % self.cfg.log_interval == 0:
                        rate = window_tokens / window_time if window_time else 0.0
                        self.metrics.log({
                            "kind": "train", "step": self.step, "train_loss": loss,
                            "lr": self.lr, "tokens": self.tokens, "tokens_per_s": rate,
                            "mfu": self.mfu(rate), "elapsed": round(self.elapsed, 3)})
                        view.rate(rate, self.mfu(rate))
                        window_time, window_tokens = 0.0, 0
                    interrupted = float(flags[1]) > 0
        finally:
            self.metrics.close()
        self.result.step = self.step
        self.result.tokens = self.tokens
        self.result.elapsed = self.elapsed
        self.result.best_val = self.best_val
        self.result.best_step = self.best_step
        self.result.stopped_by = "interrupted" if interrupted else stopped_by
        if interrupted:
            saved = (f"saved {self.result.checkpoint}; continue with the same command plus "
                     "--resume" if self.step > start else
                     "no training step had finished, so nothing was saved")
            raise TrainingInterrupted(f"stopped at step {self.step}: {saved}", self.result)
        return self.result

    def stop_reason(self) -> str | None:
        if self.step >= self.total:
            return "max_tokens" if self.total < self.cfg.max_iters else "max_iters"
        if self.cfg.max_time and self.elapsed >= self.cfg.max_time:
            return "max_time"
        return None

    def record_eval(self, net: torch.nn.Module, view: _View) -> None:
        losses = self.evaluate(net, view)
        if self.eval_overflowed:
            bad = next((v for v in losses.values() if not math.isfinite(v)), math.nan)
            if self.step == 0:
                self.non_finite_start(bad)
            self.non_finite(bad, "evaluation loss")
        self.last_eval_train, self.last_val = losses["train"], losses["val"]
        self.result.evals.append({"step": self.step, **losses})
        self.metrics.log({"kind": "eval", "step": self.step, **losses})
        view.evaluated(self.step, losses)
        if math.isfinite(losses["val"]) and (self.best_val is None
                                             or losses["val"] < self.best_val):
            self.best_val, self.best_step = losses["val"], self.step
            if self.step > 0:  # every rank: under FSDP the weights are gathered first
                weights = self.weights_to_save()
                if self.main and not self._best_is_a_base():
                    self.write_weights(best_path(self.run_dir), weights)
        self.metrics.plot()

    def _best_is_a_base(self) -> bool:
        """Another run's adapter is based on best.safetensors (`finetune.init=RUN/best...`):
        replacing it would break that run, so it stays, and the newer best lives on in this
        run's step files and its metrics."""
        users = dependents(best_path(self.run_dir))
        if users and not self._told_best_kept:
            self._told_best_kept = True
            warn(f"kept {best_path(self.run_dir)} as it is: it is the base of the LoRA run "
                 f"{users[0]}; this run's newer best is in metrics.jsonl and its step files "
                 f"(merge that run, llm finetune --merge {users[0]}, to let it go)")
        return bool(users)

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak or not self.flops_per_token:
            return None
        per_device = tokens_per_s / self.dist.world_size
        return per_device * self.flops_per_token / self.peak

    def non_finite(self, loss: float, what: str = "training loss") -> None:
        """Stop on a diverged run, naming only the causes this run's settings make likely."""
        saved = self.result.checkpoint
        last = (f"last good checkpoint: {saved}" if saved else
                "no checkpoint was written in this run")
        cfg = self.cfg
        causes = [f"a learning rate too high (train.lr={cfg.lr:g})"]
        shrink = cfg.lr * cfg.weight_decay  # AdamW multiplies the matrices by 1 - lr * decay
        if shrink >= 1:
            causes.append(f"weight decay past the weights (train.lr x train.weight_decay = "
                          f"{shrink:g}: each step multiplies the matrices by {1 - shrink:g})")
        if cfg.grad_clip == 0:
            causes.append("no gradient clipping (train.grad_clip=0: try 1.0)")
        if self.precision.name == "fp16":
            causes.append("fp16 overflow (train.precision=fp16: try bf16 or fp32)")
        fail(f"{what} became {loss} at step {self.step}; stopped without saving ({last}); "
             f"likely causes: {_either(causes)}", EXIT_FAILURE)

    def non_finite_start(self, loss: float) -> None:
        """The loss of the untrained model is not finite: training cannot fix that, and the
        optimizer settings have done nothing yet, so the diagnosis is the starting weights."""
        m = self.recipe.model
        causes = []
        if self.base is not None:
            causes.append(f"the base checkpoint {self.base}, whose outputs are not finite here")
        elif m.init == "seed":
            causes.append("the large initial weights of model.init=seed (N(0, 1) embeddings; "
                          "try model.init=gpt2)")
        elif m.init_std > DEFAULT_INIT_STD:
            causes.append(f"initial weights too large (model.init_std={m.init_std:g}: the "
                          f"default is {DEFAULT_INIT_STD:g})")
        if self.precision.name == "fp16":
            causes.append("activations beyond fp16's range of +-65504 (train.precision=fp16: "
                          "try bf16 or fp32)")
        if not causes:
            causes.append(f"the initial weights (model.init={m.init}, "
                          f"model.init_std={m.init_std:g})")
        fail(f"the loss of the model before any training is {loss} (step-0 evaluation); "
             f"stopped without training or saving; likely causes: {_either(causes)}",
             EXIT_FAILURE)


def _either(causes: list[str]) -> str:
    return causes[0] if len(causes) == 1 else f"{', '.join(causes[:-1])} or {causes[-1]}"


def _eval_part(batch_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The evaluation streams' share of a batch source's state (keys `<kind>.eval.<split>`)."""
    return {k: v.clone() for k, v in batch_state.items() if ".eval." in f".{k}"}


def world_change_note(where: str, saved: int, now: int) -> str:
    """The note of `Trainer.note_world_change`, worded for single ranks and batches too."""
    kept = min(saved, now)
    own = "continue their own batch streams" if kept > 1 else "continues its own batch stream"
    if now > saved:
        verb = "start new batch streams" if now - saved > 1 else "starts a new batch stream"
        streams = f"{_ranks(saved, now - 1)} {verb}"
    else:
        streams = (f"the batch streams of {_ranks(now, saved - 1)} end" if saved - now > 1
                   else f"the batch stream of rank {now} ends")
    return (f"note: {where} was saved by {_count(saved, 'process', 'processes')}, this run has "
            f"{now}: weights, optimizer moments, step and schedule continue exactly; "
            f"{_ranks(0, kept - 1)} {own}, {streams}, and a step now averages "
            f"{_count(now, 'batch', 'batches')} instead of {saved}, so the run is no longer "
            f"step-for-step identical to one that kept {_count(saved, 'process', 'processes')}")


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first} to {last}"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _flops_per_token(model: torch.nn.Module, recipe: Recipe) -> float | None:
    from llmcli.model.count import flops_per_token

    try:
        return flops_per_token(model, recipe.model.context_length)
    except (AttributeError, TypeError):
        return None


class _View:
    """Progress for people: a rich bar on a terminal, the seed's log lines otherwise."""

    def __init__(self, trainer: Trainer) -> None:
        from llmcli.console import is_interactive, progress, stats_column

        self.t = trainer
        self.enabled = trainer.main
        self.live = self.enabled and is_interactive()
        self.bar = progress(stats_column("stats")) if self.live else None
        self.task = None
        self.train_loss: float | None = None
        self.rate_text = ""
        self.tokens_per_s: float | None = None

    def __enter__(self) -> _View:
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.t.total, completed=self.t.step,
                                          stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _stats(self) -> str:
        parts = []
        if self.train_loss is not None:
            parts.append(f"loss {self.train_loss:.3f}")
        if self.t.last_val is not None:
            parts.append(f"val {self.t.last_val:.3f}")
        parts.append(f"lr {getattr(self.t, 'lr', self.t.cfg.lr):.2e}")
        if self.rate_text:
            parts.append(self.rate_text)
        return "  ".join(parts)

    def step(self, loss: float) -> None:
        self.train_loss = loss
        if self.bar is not None:
            self.bar.update(self.task, completed=self.t.step, stats=self._stats())

    def phase(self, name: str) -> None:
        """What the run is doing now: train, eval i/N, saving."""
        if self.bar is not None:
            self.bar.update(self.task, description=name)

    def rate(self, tokens_per_s: float, mfu: float | None) -> None:
        self.tokens_per_s = tokens_per_s
        self.rate_text = f"{tokens_per_s:,.0f} tok/s" + (f"  MFU {mfu:.0%}" if mfu else "")

    def evaluated(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = (f"Step: {step} Training Loss: {round(losses['train'], 3)} "
                f"Validation Loss: {round(losses['val'], 3)}")
        if self.tokens_per_s:
            line += f" | {self.tokens_per_s:,.0f} tokens/s"
        if self.bar is not None:
            self.bar.console.print(line)
            self.bar.update(self.task, stats=self._stats())
        else:
            info(line)


# Keys naming files, which another machine may hold at another path: what they hold is
# compared instead (the corpus or records digest of the run's metadata)
MACHINE_LOCAL_KEYS = ("data.source", "data.records", "finetune.init")
# The run's metadata compared across processes, and what each says in an error
COMPARED_META = {"corpus": "the corpus (the token file's sources and length)",
                 "rows_digest": "the instruction records (as encoded rows)"}


def run_settings(recipe: Recipe, extra_meta: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's numbers, as key -> value: every recipe key but the paths, and the
    digests of the data they name."""
    settings = {key: value for key, value, _ in recipe.rows() if key not in MACHINE_LOCAL_KEYS}
    settings.update({name: extra_meta[key] for key, name in COMPARED_META.items()
                     if key in extra_meta})
    return settings


def differing_settings(per_rank: list[dict[str, Any]]) -> str | None:
    """How the processes' settings differ from rank 0's ('train.lr: 0.001 on rank 0, 0.5 on
    rank 1; ...', the first rank that differs for each key), or None when they agree."""
    main, missing = per_rank[0], "(not set)"
    differing: dict[str, tuple[int, Any]] = {}
    for rank, mine in enumerate(per_rank[1:], 1):
        for key in sorted(main.keys() | mine.keys()):
            if key not in differing and mine.get(key, missing) != main.get(key, missing):
                differing[key] = (rank, mine.get(key, missing))
    if not differing:
        return None
    return "; ".join(f"{key}: {main.get(key, missing)!r} on rank 0, {value!r} on rank {rank}"
                     for key, (rank, value) in differing.items())


def check_same_run(recipe: Recipe, extra_meta: dict[str, Any], dist: distributed.Dist) -> None:
    """Every process of a group must train the same run: machines started with other
    overrides trained apart under rank 0's name (its checkpoint recording its own lr), or met
    a collective the others never reached (gloo's 'Connection reset by peer'). Every rank
    refuses, before any step, naming the keys."""
    if not dist.enabled:
        return
    differ = differing_settings(distributed.gather_objects(run_settings(recipe, extra_meta),
                                                           dist))
    if differ is not None:
        fail(f"the processes were started with different settings ({differ}); give every "
             "machine the same recipe and overrides (only the paths "
             f"{', '.join(MACHINE_LOCAL_KEYS)} may differ, to the same data)")


def train(
    recipe: Recipe,
    model: torch.nn.Module,
    batches: BatchSource,
    run_dir: Path,
    *,
    device: torch.device | str,
    resume: Path | None = None,
    save_weights: SaveWeights | None = None,
    extra_meta: dict | None = None,
    base: Path | None = None,
    before_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `model` on `batches` as `recipe.train` says; see the module docstring."""
    trainer = Trainer(recipe, model, batches, Path(run_dir), torch.device(device), save_weights,
                      extra_meta, base)
    return trainer.run(resume, before_start)
