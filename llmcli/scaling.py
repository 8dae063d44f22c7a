"""Chinchilla scaling maths: how big a model, how many tokens, how much compute, how long.

Pure Python on purpose (no torch, no numpy): `llm scaling` has to answer in well under a second.

N is the parameter count, D the training tokens, C = 6·N·D the training FLOPs (forward 2ND,
backward 4ND). Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", fit the
final loss as L(N, D) = E + A/N^α + B/D^β (approach 3). Minimising L under a fixed C gives the
closed form

    N_opt = G·(C/6)^a,  D_opt = (C/6)^b / G,  G = (αA / (βB))^(1/(α+β)),  a = β/(α+β),  b = α/(α+β)

Their Table 3 (approach 1) is the "about 20 tokens per parameter" rule. Besiroglu et al. 2024
("Chinchilla Scaling: A replication attempt") refit approach 3 on the paper's own data and found
the published coefficients inconsistent with approaches 1 and 2; their fit lands near 20 tokens
per parameter again. Both fits are offered (`--fit chinchilla|epoch`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.console import fail
from llmcli.constants import TOKENIZER_VOCAB
from llmcli.hardware import GPU, GPUS, get_gpu

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, Table 3: 400M -> 8.0B tokens, 1B -> 20.2B, ...
DEFAULT_MFU = 0.4  # a well-tuned dense transformer on modern GPUs reaches about 35-50 %
MIN_MFU = 0.001  # 0.1 %: below it a utilisation is a typo, and wall-clock times overflow
MAX_VALUE = 1e30  # beyond any training run; also keeps the power laws inside float range


def chinchilla_tokens(n: float) -> float:
    """Compute-optimal training tokens for n parameters by the ~20 tokens-per-parameter rule."""
    return TOKENS_PER_PARAM * n


def training_flops(n: float, d: float) -> float:
    """Training compute C = 6ND (2ND forward, 4ND backward; attention's extra term left out)."""
    return 6.0 * n * d


# ---------------------------------------------------------------------------------------------
# The fitted loss law


@dataclass(frozen=True)
class Fit:
    name: str
    title: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        """Predicted final training loss (nats per token) of n parameters trained on d tokens."""
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        """N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) with the lowest predicted loss for a compute budget of `flops` (C = 6ND)."""
        x = flops / 6.0
        return self.G * x**self.a, x**self.b / self.G

    def tokens_for_params(self, n: float) -> float:
        """The D that makes n parameters compute-optimal: the budget whose N_opt is n."""
        x = (n / self.G) ** (1.0 / self.a)
        return x**self.b / self.G

    def params_for_tokens(self, d: float) -> float:
        """The model size that d tokens serve best: the budget whose D_opt is d."""
        x = (d * self.G) ** (1.0 / self.b)
        return self.G * x**self.a

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "E": self.E, "A": self.A, "B": self.B,
                "alpha": self.alpha, "beta": self.beta, "G": self.G, "a": self.a, "b": self.b}


FITS: dict[str, Fit] = {
    "chinchilla": Fit("chinchilla", "Hoffmann et al. 2022, approach 3",
                      E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "epoch": Fit("epoch", "Besiroglu et al. 2024 (Epoch AI) refit",
                 E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}
FIT_ALIASES = {"hoffmann": "chinchilla", "besiroglu": "epoch"}


def get_fit(name: str) -> Fit:
    key = FIT_ALIASES.get(name.lower(), name.lower())
    if key not in FITS:
        fail(f"--fit {name!r}: unknown fit{_suggest(key, [*FITS, *FIT_ALIASES])}; choose "
             f"{' or '.join(FITS)}")
    return FITS[key]


# ---------------------------------------------------------------------------------------------
# Hardware: how fast training runs (the peak table lives in llmcli/hardware.py)


@dataclass(frozen=True)
class Hardware:
    """How fast training runs: a GPU's peak at an assumed MFU, or a measured throughput."""

    label: str
    flops_per_second: float  # sustained model FLOPs per second, all GPUs together
    gpu: GPU | None
    num_gpus: int
    mfu: float | None
    tokens_per_second: float | None  # measured, per GPU

    def seconds(self, flops: float) -> float:
        return flops / self.flops_per_second

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "gpu": self.gpu.key if self.gpu else None,
                "gpu_name": self.gpu.name if self.gpu else None,
                "peak_flops": self.gpu.tflops * 1e12 if self.gpu else None,
                "peak_source": self.gpu.source if self.gpu else None,
                "num_gpus": self.num_gpus, "mfu": self.mfu,
                "tokens_per_second": self.tokens_per_second,
                "flops_per_second": self.flops_per_second}


def check_gpus(num_gpus: int) -> None:
    """Before anything is planned with them: a recipe's tokens per step scale with them too."""
    if num_gpus < 1:
        fail(f"--num-gpus {num_gpus}: must be 1 or more")


def make_hardware(
    gpu: str | None = None,
    num_gpus: int = 1,
    mfu: float | None = None,
    tokens_per_second: float | None = None,
    measured_params: float | None = None,
) -> Hardware:
    """The throughput behind wall-clock estimates.

    A measured tokens/s belongs to one model size (`measured_params`); it is turned into model
    FLOPs per second (6N per token) so that plans with other sizes can be timed with it too,
    and it replaces the assumed `mfu` (DEFAULT_MFU when None), so the two are never given
    together. Without a GPU or a measurement the estimate assumes one H100, and says so.
    """
    check_gpus(num_gpus)
    if mfu is not None and tokens_per_second is not None:
        fail("--mfu and --tokens-per-second: a measured throughput replaces the assumed "
             "utilisation (with --gpu it shows the MFU it implies); give one of them")
    mfu = DEFAULT_MFU if mfu is None else mfu
    if not MIN_MFU <= mfu <= 1:
        fail(f"--mfu {mfu:g}: utilisation must be from 0.1% to 100% (a fraction like 0.4, or a "
             "percentage like 40%)")
    card = get_gpu(gpu) if gpu is not None else None  # '' is refused, not the default
    gpus = f"{num_gpus}× " if num_gpus > 1 else ""
    if tokens_per_second is not None:
        if measured_params is None:
            fail("--tokens-per-second: a measured throughput belongs to one model size; add "
                 "--params N (the model you measured) or --recipe")
        sustained = tokens_per_second * num_gpus * training_flops(measured_params, 1.0)
        label = f"measured {format_count(tokens_per_second)} tokens/s per GPU"
        implied = None
        if card is not None:
            implied = sustained / (num_gpus * card.tflops * 1e12)
            label += f" on {gpus}{card.name} ({format_ratio(implied * 100)}% MFU)"
        elif num_gpus > 1:
            label += f" × {num_gpus} GPUs"
        return Hardware(label, sustained, card, num_gpus, implied, tokens_per_second)
    card = card or GPUS["h100"]
    label = (f"{gpus}{card.name} at {mfu * 100:.3g}% MFU ({card.tflops:g} TFLOPS {card.dtype} "
             "peak)")
    if gpu is None:
        label += "; pick yours with --gpu"
    return Hardware(label, num_gpus * card.tflops * 1e12 * mfu, card, num_gpus, mfu, None)


# ---------------------------------------------------------------------------------------------
# Plans: (N, D) pairs compared side by side


@dataclass(frozen=True)
class Plan:
    label: str
    params: float
    tokens: float

    @property
    def flops(self) -> float:
        return training_flops(self.params, self.tokens)

    @property
    def is_model(self) -> bool:
        """At least one parameter and one token: below that a plan (the optimum of a tiny
        compute budget) is arithmetic, not a model to train."""
        return self.params >= 1 and self.tokens >= 1

    def sizes(self) -> str:
        return (f"{counted_ratio(self.params, 'parameter')} and "
                f"{counted_ratio(self.tokens, 'token')}")

    def describe(self, fit: Fit, hardware: Hardware) -> dict[str, Any]:
        return {"label": self.label, "params": self.params, "tokens": self.tokens,
                "tokens_per_param": self.tokens / self.params, "flops": self.flops,
                "loss": fit.loss(self.params, self.tokens),
                "seconds": hardware.seconds(self.flops), "meaningful": self.is_model}


def plans_for(
    fit: Fit, params: float | None = None, tokens: float | None = None, flops: float | None = None
) -> tuple[str, dict[str, Plan]]:
    """The mode and the plans to compare, from any one or two of N, D and C.

    One quantity: the 20-tokens-per-parameter rule beside the fitted law's optimum.
    Two: the plan as given, the rule for the same N, and the fit's optimum for the same compute.
    """
    values = {"params": params, "tokens": tokens, "flops": flops}
    given = [k for k, v in values.items() if v is not None]  # a 0 is given (and refused)
    for key in given:
        if not values[key] >= 1:  # parse_number's rule, for callers of the API too
            fail(f"--{key} {values[key]:g}: must be positive, at least 1")
    if not given:
        fail("nothing to plan: give --params, --tokens, --flops or --recipe, e.g. "
             "llm scaling --params 140M")
    if len(given) == 3:
        fail("--params, --tokens and --flops together over-determine the plan (C = 6ND); "
             "give any two of them")
    mode, plans = _plans(fit, given, params, tokens, flops)
    # One input: every column is derived from it, and one that is no model refuses it. Two:
    # the user's own plan stands, however small, and a derived column that is no model is
    # marked so ("meaningful": false), never shown as if it were one.
    for plan in plans.values() if len(given) == 1 else ():
        if not plan.is_model:
            inputs = " and ".join(f"--{k} {format_count(values[k])}" for k in given)
            fail(f"{inputs}: too small a budget to plan: the {plan.label} plan would have "
                 f"{plan.sizes()}, and a model needs at least 1 of each; raise it")
    return mode, plans


def _plans(fit: Fit, given: list[str], params: float | None, tokens: float | None,
           flops: float | None) -> tuple[str, dict[str, Plan]]:
    rule = f"{TOKENS_PER_PARAM:g} tokens/param"
    law = f"{fit.name} optimum"
    if given == ["params"]:
        assert params is not None
        return "params", {"rule": Plan(rule, params, chinchilla_tokens(params)),
                          "optimal": Plan(law, params, fit.tokens_for_params(params))}
    if given == ["tokens"]:
        assert tokens is not None
        return "tokens", {"rule": Plan(rule, tokens / TOKENS_PER_PARAM, tokens),
                          "optimal": Plan(law, fit.params_for_tokens(tokens), tokens)}
    if given == ["flops"]:
        assert flops is not None
        n_rule = math.sqrt(flops / (6.0 * TOKENS_PER_PARAM))
        return "flops", {"rule": Plan(rule, n_rule, chinchilla_tokens(n_rule)),
                         "optimal": Plan(law, *fit.optimal(flops))}
    if params is None:
        assert tokens is not None and flops is not None
        params = flops / (6.0 * tokens)
        if params < 1:  # parse_number's rule for a given N, applied to the derived one
            fail(f"--tokens {format_count(tokens)} and --flops {format_count(flops)} leave "
                 f"N = C / 6D = {format_ratio(params)} parameters; a model needs at least 1 "
                 "parameter: raise --flops or lower --tokens")
    elif tokens is None:
        assert flops is not None
        tokens = flops / (6.0 * params)
        if tokens < 1:
            fail(f"--params {format_count(params)} and --flops {format_count(flops)} leave "
                 f"D = C / 6N = {format_ratio(tokens)} tokens; training needs at least 1 "
                 "token: raise --flops or lower --params")
    return "plan", given_plans(fit, params, tokens)


def given_plans(fit: Fit, params: float, tokens: float, label: str = "this plan") -> dict:
    plan = Plan(label, params, tokens)
    return {"given": plan,
            "rule": Plan(f"{TOKENS_PER_PARAM:g} D/N, same N", params,
                         chinchilla_tokens(params)),
            "optimal": Plan("optimum, same C", *fit.optimal(plan.flops))}


def verdict(fit: Fit, plans: dict[str, Plan]) -> str:
    """A plain sentence on a given plan: under-trained, about right, or trained past optimal."""
    given, optimal = plans["given"], plans["optimal"]
    n, d = given.params, given.tokens
    target = chinchilla_tokens(n)
    ratio = d / target
    head = (f"{counted(d, 'token')} for {counted(n, 'parameter')} "
            f"({counted_ratio(d / n, 'token')} per parameter)")
    same_compute = (f"the same compute ({format_flops(given.flops)} FLOPs) is best spent, by the "
                    f"{fit.name} law, on {counted(optimal.params, 'parameter')} and "
                    f"{counted(optimal.tokens, 'token')}: predicted loss "
                    f"{fit.loss(optimal.params, optimal.tokens):.3f} instead of "
                    f"{fit.loss(n, d):.3f}")
    if not optimal.is_model:
        same_compute = (f"the same compute ({format_flops(given.flops)} FLOPs) is too small for "
                        f"the {fit.name} law's optimum to be a model ({optimal.sizes()})")
    if ratio < 0.5:
        return (f"under-trained: {head} is about {_about(1 / ratio)}× fewer tokens than "
                f"Chinchilla-optimal ({format_count(target)}); {same_compute}.")
    if ratio <= 2:
        return (f"about compute-optimal: {head}, near the {TOKENS_PER_PARAM:g} per parameter "
                f"of Chinchilla ({format_count(target)}).")
    return (f"trained past Chinchilla-optimal: {head} is about {_about(ratio)}× more tokens than "
            f"{format_count(target)}; for the loss alone {same_compute}, but the smaller model "
            f"is cheaper to run (the trade-off Llama makes).")


def analyse(
    *,
    params: float | None = None,
    tokens: float | None = None,
    flops: float | None = None,
    recipe: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    fit: str = "chinchilla",
    gpu: str | None = None,
    num_gpus: int = 1,
    mfu: float | None = None,
    tokens_per_second: float | None = None,
    device_bytes: int | None = None,
) -> dict[str, Any]:
    """Everything `llm scaling` prints, as one JSON-ready dict (also the `--json` output).

    "device_memory" (when N is known: --params or --recipe): memory per GPU under DDP and FSDP
    with `num_gpus` processes (`device_memory`)."""
    law = get_fit(fit)
    check_gpus(num_gpus)
    if device_bytes is not None and recipe is None and params is None:
        fail("--device-memory: the memory per GPU needs the model's size; add --params N or "
             "--recipe")
    report: dict[str, Any] = {"fit": law.to_dict()}
    if recipe is not None:
        if params is not None or tokens is not None or flops is not None:
            fail("--recipe gives the parameters and tokens itself; drop --params/--tokens/"
                 "--flops, or override the recipe (e.g. train.max_iters=100000)")
        facts = recipe_facts(recipe, overrides, num_gpus)
        mode = "recipe"
        plans = given_plans(law, facts["params"], facts["planned_tokens"], "recipe")
        report["recipe"] = facts
    else:
        if overrides:
            fail(f"'{overrides[0]}': section.key=value overrides need --recipe")
        mode, plans = plans_for(law, params, tokens, flops)
    reference = plans["given"].params if "given" in plans else params
    hardware = make_hardware(gpu, num_gpus, mfu, tokens_per_second, reference)
    report["mode"] = mode
    report["inputs"] = {"params": params, "tokens": tokens, "flops": flops,
                        "recipe": str(recipe) if recipe is not None else None}
    report["hardware"] = hardware.to_dict()
    report["plans"] = {key: plan.describe(law, hardware) for key, plan in plans.items()}
    if "given" in plans:
        report["verdict"] = verdict(law, plans)
        if recipe is not None and report["recipe"]["finetune_init"]:
            report["verdict"] = (
                f"a fine-tuning recipe (from {report['recipe']['finetune_init']}): the "
                f"Chinchilla trade-off is about pretraining from scratch, and fine-tuning needs "
                f"far fewer tokens; as if pretraining, {report['verdict']}")
    report["device_memory"] = None
    cap = DEFAULT_DEVICE_MEMORY if device_bytes is None else device_bytes
    if recipe is not None:
        facts = report["recipe"]
        report["device_memory"] = device_memory(
            facts["params"], num_gpus, trainable=facts["trainable"], block=facts["block_params"],
            blocks=facts["num_blocks"], precision=facts["precision"], device_bytes=cap)
    elif params is not None:
        report["device_memory"] = device_memory(int(params), num_gpus, device_bytes=cap)
    return report


# ---------------------------------------------------------------------------------------------
# Recipes: N from the formula (no torch), D from the training plan


def recipe_facts(path: str | Path, overrides: tuple[str, ...] | list[str] = (),
                 processes: int = 1) -> dict[str, Any]:
    """N (counted as `llm params` counts it: `llmcli.params.training_view`), planned tokens and
    where the vocabulary size came from, for one recipe trained by `processes` processes.

    The tokens are the trainer's: every process trains its own batch, so a step covers
    `processes` of them (`llm pretrain --nproc N`), and train.max_tokens ends the run after the
    step that reaches it (`total_steps`)."""
    from llmcli.model.count import formula_parameters
    from llmcli.params import training_view
    from llmcli.recipe import load_recipe
    from llmcli.train.schedule import total_steps

    trained = training_view(load_recipe(path, list(overrides)))
    recipe = trained.recipe
    sidecar = find_sidecar(recipe.data.source, recipe.data.tokenizer)
    t, m = recipe.train, recipe.model
    per_step = t.batch_size * t.grad_accum * m.context_length * processes
    steps = total_steps(t, per_step)
    planned = steps * per_step
    model = formula_parameters(m)
    facts: dict[str, Any] = {
        "name": recipe.name, "path": str(path),
        "params": model + (trained.adapter or 0),
        "trainable": model if trained.adapter is None else trained.adapter,
        "vocab_size": int(m.vocab_size), "vocab_note": trained.vocab_note,
        "notes": [*trained.notes, *budget_notes(t, processes)],
        "max_iters": t.max_iters, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "context_length": m.context_length, "max_tokens": t.max_tokens, "max_time": t.max_time,
        "processes": processes, "tokens_per_step": per_step, "steps": steps,
        "step_tokens": t.max_iters * per_step, "planned_tokens": planned, "corpus_tokens": None,
        "epochs": None,
        "finetune_init": recipe.finetune.init,
        "num_blocks": m.num_blocks,
        "block_params": (formula_parameters(dataclasses.replace(m, num_blocks=1))
                         - formula_parameters(dataclasses.replace(m, num_blocks=0))),
        "precision": "fp32" if t.precision == "fp32" else "bf16",
    }
    if sidecar is not None:
        train_tokens = int(sidecar[1].get("val_start") or sidecar[1].get("num_tokens") or 0)
        if train_tokens > 0:
            facts["corpus"] = str(sidecar[0])
            facts["corpus_tokens"] = train_tokens
            facts["epochs"] = planned / train_tokens
    return facts


def budget_notes(train: Any, processes: int) -> list[str]:
    """What shapes the planned tokens beyond the recipe's steps: processes, and a time limit."""
    notes = []
    if processes > 1:
        notes.append(f"each of the {processes} GPUs trains its own batch, as `llm pretrain "
                     f"--nproc {processes}` does: a step is {processes} batches")
    if train.max_time:
        notes.append(f"train.max_time={format_ratio(train.max_time)} s may stop the run before "
                     "these tokens; `llm pretrain --dry-run` estimates where from measured steps")
    return notes


def recipe_vocab(recipe: Any, sidecar: tuple[Path, dict] | None) -> tuple[int, str]:
    """The vocabulary N is counted with, and a note saying where it came from.

    `model.vocab_size: auto` is resolved as pretraining resolves it: the largest id + 1, or
    with `data.vocab: compact` the distinct ids of the training part + 1 for unknown ids.
    """
    vocab_size = recipe.model.vocab_size
    if vocab_size != "auto":
        return int(vocab_size), "from the recipe"
    compact = recipe.data.vocab == "compact"
    if sidecar is not None:
        path, meta = sidecar
        if compact and meta.get("compact_vocab_ids"):
            return int(meta["compact_vocab_ids"]) + 1, (
                f"auto: {meta['compact_vocab_ids']:,} ids of the training part of {path} (with "
                "end-of-text and the template tokens) + 1 for unknown ids")
        if compact and meta.get("distinct_ids"):
            return int(meta["distinct_ids"]) + 1, (
                f"auto: {meta['distinct_ids']:,} distinct ids in {path} + 1 for unknown ids (an "
                "upper bound: training keeps the training part's; re-run `llm tokenize`)")
        if not compact and meta.get("max_id") is not None:
            return int(meta["max_id"]) + 1, f"auto: largest id in {path} + 1"
    name = recipe.data.tokenizer
    vocab = TOKENIZER_VOCAB[name]
    why = (f"auto, and data '{', '.join(recipe.data.sources)}' is not tokenized yet: counted "
           f"with the full {name} vocabulary of {vocab:,}")
    if compact:
        why += " (an upper bound: a compact vocabulary keeps only the corpus's ids)"
    return vocab, why + "; run `llm tokenize` first for the exact figure"


def find_sidecar(
    source: str | list[str], tokenizer: str, data_dir: Path = Path("data")
) -> tuple[Path, dict] | None:
    """(sidecar path, sidecar) of the token file already holding a recipe's data, or None.

    The one "already tokenized" rule (`llmcli.data.token_cache.locate`): nothing is downloaded
    or written, and no numpy is imported.
    """
    from llmcli.data.token_cache import description_path, locate

    cached = locate(source, tokenizer, data_dir)
    return (description_path(cached.path), cached.meta) if cached is not None else None


# ---------------------------------------------------------------------------------------------
# Human numbers: 140M, 1.4e8, 7B, 1.5T in; 140.6M, 2.8B, 1.5T out

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
# A mantissa (1_000, 1,000, 1.5 or .5), then an optional exponent: "e5" alone is no number.
_NUMBER = re.compile(r"^(?:(?:[0-9]+(?:_[0-9]+)*|[0-9]{1,3}(?:,[0-9]{3})+)(?:\.[0-9]+)?"
                     r"|\.[0-9]+)(?:e[+-]?[0-9]+)?$")


def parse_number(text: str, option: str = "value",
                 example: str = "140M, 1.4e8, 7B or 1.5T") -> float:
    """'140M' -> 1.4e8; also 1.4e8, 7B, 1.5T, 12k, 100_000, 1,000,000. One-line error else."""
    raw = str(text).strip()
    body = raw.lower()
    scale = 1.0
    if body and body[-1] in _SUFFIXES:
        scale = _SUFFIXES[body[-1]]
        body = body[:-1].strip()
    negative = body.startswith("-")
    body = body.lstrip("-+").strip() if negative or body.startswith("+") else body
    if not _NUMBER.match(body):
        fail(f"{option} {raw!r}: not a number; write it like {example}")
    value = float(body.replace("_", "").replace(",", "")) * scale
    if negative or not value >= 1:  # a count: below 1 the power laws divide by ~0
        fail(f"{option} {raw!r}: must be positive, at least 1")
    if value > MAX_VALUE:
        fail(f"{option} {raw!r}: larger than {MAX_VALUE:.0e}, beyond any training run")
    return value


def parse_count(text: str, option: str, noun: str) -> float:
    """A count of `noun`s (parameters, tokens): parse_number, whole numbers only, as
    --num-gpus; '140.6M' is whole, '2.5' is refused rather than planned with half a parameter."""
    value = parse_number(text, option)
    whole = round(value)
    if abs(value - whole) > 1e-12 * value:  # float noise in '0.3M' is no fraction
        fail(f"{option} {str(text).strip()!r}: must be a whole number of {noun}, e.g. "
             f"{math.floor(value):,} or {math.ceil(value):,}")
    return float(whole)


def parse_fraction(text: str, option: str = "--mfu") -> float:
    """'40%' or '0.4' -> 0.4, from 0.1% to 100%."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw.rstrip("%").strip()) / (100.0 if percent else 1.0)
    except ValueError:
        fail(f"{option} {raw!r}: not a fraction; write it like 0.4 or 40%")
    if not MIN_MFU <= value <= 1:
        fail(f"{option} {raw!r}: must be from 0.1% to 100% (a fraction like 0.4, or a "
             "percentage like 40%); below 0.1% no GPU trains")
    return value


def format_count(x: float) -> str:
    """1.406e8 -> '140.6M', 2.8e9 -> '2.8B', 8e9 -> '8.0B' (the paper's style), 512 -> '512'."""
    if x >= 1e15:
        return format_flops(x)
    units = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    for i, (unit, suffix) in enumerate(units):
        if x >= unit:
            text = f"{x / unit:.1f}"
            if float(text) >= 1000 and i > 0:  # 999.96M rounds to 1.0B, not 1000.0M
                bigger, big_suffix = units[i - 1]
                return f"{x / bigger:.1f}{big_suffix}"
            return text + suffix
    return f"{x:.0f}" if x == int(x) or x >= 100 else f"{x:.3g}"


def counted(x: float, noun: str) -> str:
    """'1 parameter', '2.5M parameters'."""
    text = format_count(x)
    return f"{text} {noun}" + ("" if text == "1" else "s")


def counted_ratio(x: float, noun: str) -> str:
    """'1 token', '0.0824 tokens', '1.00e30 tokens' (per something)."""
    text = format_ratio(x)
    return f"{text} {noun}" + ("" if text == "1" else "s")


def format_ratio(x: float) -> str:
    """3 significant digits (28.9, 0.0824), whole from 1,000 (9,999: never Python's 1e+04), and
    the e-notation of the other cells (1.00e30, 1.67e-31) outside 0.001 to a million."""
    if not 1e-3 <= x < 999_999.5:
        return format_flops(x)
    return f"{x:.3g}" if x < 999.5 else f"{x:,.0f}"


def format_flops(x: float) -> str:
    """2.37e18 rather than 2.37e+18."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 365.25 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{_big(seconds / (365.25 * 86400), '.1f')} years"


def _about(x: float) -> str:
    return f"{x:.1f}" if x < 9.95 else f"{x:.2g}" if x < 99.5 else _big(round(x, -1), ",.0f")


def _big(x: float, spec: str) -> str:
    """x in `spec`, or in e-notation (1.46e19) from a million on: never a 20-digit string."""
    return format_flops(x) if x >= 1e6 else format(x, spec)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------
# The iso-FLOP plot


def plot_isoflops(path: str | Path, report: dict[str, Any]) -> Path:
    """Loss against model size at five compute budgets (the paper's Figure 3 view), optima marked.

    The budgets are 1/100×, 1/10×, 1×, 10× and 100× the compute of the report's first plan (the
    one given, or the 20 tokens-per-parameter rule), which is starred on the middle curve.
    """
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        fail(f"--plot {target}: the file must end in .png, .svg or .pdf")
    if target.is_dir():
        fail(f"--plot {target}: is a directory; give a file name such as {target / 'isoflop.png'}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmcli.files import atomic_path
    fit = FITS[report["fit"]["name"]]
    first = next(iter(report["plans"].values()))  # the given plan, else the 20 D/N rule
    centre = first["flops"]
    marks = [first]

    fig, ax = plt.subplots(figsize=(8, 5.5))
    frontier = []
    for k in (-2, -1, 0, 1, 2):
        budget = centre * 10.0**k
        n_opt, d_opt = fit.optimal(budget)
        low, high = n_opt / 30, n_opt * 30
        if k == 0:  # stretch the middle curve to reach the marked plans
            on_curve = [m["params"] for m in marks if math.isclose(m["flops"], budget)]
            low = min([low, *(n / 2 for n in on_curve)])
            high = max([high, *(n * 2 for n in on_curve)])
        sizes = [low * (high / low) ** (i / 199) for i in range(200)]
        losses = [fit.loss(n, budget / (6 * n)) for n in sizes]
        (line,) = ax.plot(sizes, losses, label=f"C = {format_flops(budget)} FLOPs",
                          linewidth=2.2 if k == 0 else 1.2)
        ax.plot([n_opt], [fit.loss(n_opt, d_opt)], "o", color=line.get_color())
        frontier.append((n_opt, fit.loss(n_opt, d_opt)))
    ax.plot([n for n, _ in frontier], [loss for _, loss in frontier], "--", color="grey",
            linewidth=1, label=f"optimum (N ∝ C^{fit.a:.2f}, D ∝ C^{fit.b:.2f})")
    for mark in marks:
        ax.plot([mark["params"]], [mark["loss"]], "*", markersize=13, color="black")
        ax.annotate(f"{mark['label']}: {format_count(mark['params'])} params, "
                    f"{format_count(mark['tokens'])} tokens",
                    (mark["params"], mark["loss"]), textcoords="offset points",
                    xytext=(8, 8), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("predicted loss L(N, D = C / 6N)")
    ax.set_title(f"iso-FLOP curves, {fit.title}\n"
                 f"L = {fit.E:g} + {fit.A:g}/N^{fit.alpha:g} + {fit.B:g}/D^{fit.beta:g}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return target


# ---------------------------------------------------------------------------------------------
# Memory per device: DDP (a full copy per process) vs FSDP (sharded), activations aside

DEFAULT_DEVICE_MEMORY = 80 * 2**30  # an 80 GB H100 / A100 holds 80 GiB


def parse_bytes(text: str, option: str = "--device-memory") -> int:
    """'80GiB', '80GB' (10^9), '141G' (GiB), '24576MiB', '512B' -> bytes; a bare number, which
    no one means as bytes, and anything else is a one-line error."""
    raw = str(text).strip()
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)", raw.lower())
    if not match:
        fail(f"{option} {raw!r}: not a memory size; write it like 80GiB, 80GB or 141G")
    power = " kmgt".index(match.group(2) or " ")
    decimal = match.group(3) == "b"  # GB: 10^9; GiB or a bare G: 2^30
    size = round(float(match.group(1)) * ((1000 if decimal else 1024) ** power))
    if size < 1:  # 0, 0.5, 0.4B: no device, and never "not given" (the default)
        fail(f"{option} {raw!r}: less than 1 byte; write a device's memory like 80GiB, 80GB "
             "or 141G")
    if not match.group(2) and match.group(3) != "b":  # '80' is 80 GB to a user, 80 B to us
        fail(f"{option} {raw!r}: a memory size needs a unit; write it like "
             f"{match.group(1)}GB (10^9 bytes) or {match.group(1)}GiB (2^30 bytes)")
    if size > 2**60:
        fail(f"{option} {raw!r}: larger than any device")
    return size


def device_memory(params: int, processes: int, *, trainable: int | None = None,
                  block: int | None = None, blocks: int | None = None,
                  precision: str = "bf16", device_bytes: int = DEFAULT_DEVICE_MEMORY
                  ) -> dict[str, Any]:
    """Bytes each device holds for weights, gradients and AdamW under DDP and under FSDP with
    `processes` processes, as `llm pretrain` trains (activations and the allocator's slack
    aside; `train.activation_checkpointing` shrinks the activations, not these).

    DDP: fp32 weights (4 B each), fp32 gradients (4 B), AdamW's two fp32 moments (8 B), and
    DDP's gradient buckets (4 B) on every device, however many processes.
    FSDP (FSDP2, bf16 through its mixed-precision policy): the fp32 weights, gradients and
    moments divided by `processes`, plus the working copies it gathers: the root (embeddings,
    final norm, output layer) for the whole step and about two blocks at a time, in the compute
    dtype, and the unsharded gradients of the largest of those before each reduce-scatter
    (compute dtype + an fp32 copy). `block`/`blocks` give the shape (one block's parameters,
    how many); without them the working copies are unknown and left out (said so).
    FSDP also builds the whole fp32 model on every device before sharding it (`start`): a
    model whose weights alone exceed a device cannot start, however many processes.
    """
    n = int(params)
    t = int(trainable if trainable is not None else params)
    p = max(1, int(processes))
    c = 4 if precision == "fp32" else 2
    ddp = {"weights": 4 * n, "gradients": 4 * t, "adamw": 8 * t,
           "working": 4 * t if p > 1 else 0}
    shape_known = block is not None and blocks is not None
    working = None
    if shape_known:
        root = max(0, n - blocks * block)
        working = c * (root + min(2, blocks) * block) + (c + 4) * max(root, block)
    if p > 1:
        fsdp = {"weights": math.ceil(4 * n / p), "gradients": math.ceil(4 * t / p),
                "adamw": math.ceil(8 * t / p), "working": working}
    else:  # one process trains plainly whatever train.parallel says
        fsdp = dict(ddp)
    out: dict[str, Any] = {"processes": p, "precision": "fp32" if c == 4 else "bf16",
                           "device_bytes": int(device_bytes), "shape_known": shape_known}
    for name, parts in (("ddp", ddp), ("fsdp", fsdp)):
        total = sum(v for v in parts.values() if v is not None)
        out[name] = {**parts, "total": total, "fits": total <= device_bytes}
    if p > 1:  # one process trains plainly: nothing is sharded, nothing built twice
        out["fsdp"]["start"] = 4 * n
        out["fsdp"]["fits"] = out["fsdp"]["fits"] and 4 * n <= device_bytes
    out["verdict"] = memory_verdict(out)
    return out


def memory_verdict(mem: dict[str, Any]) -> str:
    p, cap = mem["processes"], mem["device_bytes"]
    ddp, fsdp = mem["ddp"], mem["fsdp"]
    room = f"{format_bytes(cap)} per device"
    if p == 1:
        return (f"one process: {format_bytes(ddp['total'])} of {room} "
                f"({'fits' if ddp['fits'] else 'does not fit'}; activations extra); FSDP needs "
                "several processes")
    if ddp["fits"]:
        return (f"DDP fits ({format_bytes(ddp['total'])} of {room}, activations extra): "
                f"train.parallel=ddp is enough; FSDP would need {format_bytes(fsdp['total'])}")
    if fsdp["fits"]:
        return (f"DDP does not fit ({format_bytes(ddp['total'])} > {room}); FSDP over {p} "
                f"processes does ({format_bytes(fsdp['total'])}, activations extra): use "
                "train.parallel=fsdp")
    if fsdp.get("start", 0) > cap and fsdp["total"] <= cap:
        return (f"neither fits {room}: DDP {format_bytes(ddp['total'])}; FSDP over {p} processes "
                f"would hold {format_bytes(fsdp['total'])}, but it builds the whole fp32 model "
                f"({format_bytes(fsdp['start'])}) on every device before sharding it; use "
                "devices with more memory")
    return (f"neither fits {room}: DDP {format_bytes(ddp['total'])}, FSDP over {p} processes "
            f"{format_bytes(fsdp['total'])}; shard over more devices (--nproc/--nnodes)")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{_big(n, '.1f')} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def strict_json(data: Any) -> str:
    """`--json` text that is always strict JSON: a non-finite float (which the checks above
    should make impossible) becomes null instead of the invalid Infinity/NaN tokens."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), allow_nan=False)
