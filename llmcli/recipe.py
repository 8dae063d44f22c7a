"""Recipes: YAML files turned into typed, validated configuration objects.

A recipe has sections (`data`, `model`, `train`, `finetune`, `lora`, `generate`); every key has a
default documented beside it below, so `llm pretrain --dry-run` can say where each value came
from: the default, the file, or a `section.key=value` override on the command line.
Pure Python: importing this module must stay cheap (no torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal, NoReturn, Union

import yaml

from llmcli.console import check_readable, fail
from llmcli.data.templates import TEMPLATES, template_problem

Auto = Literal["auto"]
TOKENIZER_NAMES = ("cl100k_base", "bytes")
HF_TOKENIZER = re.compile(r"hf-[0-9a-f]{16}")  # an imported tokenizer (llmcli.interop)


def _doc(default: Any, doc: str, **kwargs: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class DataConfig:
    source: str | list[str] = _doc(
        "builtin",
        "corpus: a .txt file, a directory of .txt files, Alpaca .json/.jsonl, a token file "
        "from `llm tokenize` (.tokens), or a `llm fetch` preset (builtin, sales-textbook, ...); "
        "a list of them is one mixed corpus, its documents separated by end-of-text",
    )
    tokenizer: str = _doc(
        "cl100k_base", "cl100k_base (tiktoken, the seed's), bytes (256 ids), or hf-<digest>: a "
        "transformers tokenizer stored by `llm import`"
    )
    vocab: Literal["full", "compact"] = _doc(
        "full", "full: token ids as the tokenizer gives them; compact: the corpus's distinct ids "
        "mapped to a dense range (a much smaller embedding for small corpora)"
    )
    val_fraction: float = _doc(0.1, "fraction of the corpus held out for validation (seed: 0.1)")
    records: str | None = _doc(
        None, "instruction records `llm finetune` uses, as a Python slice 'start:stop' (seed: "
        "'1000:5001'); `llm pretrain` reads them all"
    )

    @property
    def sources(self) -> list[str]:
        """`source` as a list (one corpus or several mixed)."""
        return list(self.source) if isinstance(self.source, list) else [self.source]


@dataclass
class ModelConfig:
    vocab_size: int | Auto = _doc(
        100256, "output vocabulary; 'auto' = largest token id in the corpus + 1 (compact: its size)"
    )
    context_length: int = _doc(128, "tokens the model sees at once")
    d_model: int = _doc(512, "width of the residual stream")
    num_blocks: int = _doc(12, "transformer blocks")
    num_heads: int = _doc(8, "attention heads per block; must divide d_model")
    dropout: float = _doc(0.1, "dropout after attention weights, attention output and FFN")
    positions: Literal["sinusoidal", "learned", "rope"] = _doc(
        "sinusoidal", "position information: the seed's sinusoidal table, a learned table, or RoPE"
    )
    norm: Literal["layernorm", "rmsnorm"] = _doc("layernorm", "normalisation layer")
    activation: Literal["relu", "gelu", "swiglu"] = _doc("relu", "feed-forward non-linearity")
    ffn_hidden: int | Auto = _doc(
        "auto", "feed-forward hidden width; auto = 4·d_model (swiglu: 8/3·d_model rounded to 64)"
    )
    bias: bool = _doc(True, "bias in the attention output, feed-forward and norms")
    output_bias: bool | Auto = _doc(
        "auto", "bias in the output layer; auto = as `bias` (GPT-2 has none: false)")
    qkv_bias: bool = _doc(False, "bias in the query/key/value projections (seed: none)")
    tie_embeddings: bool = _doc(False, "share the token embedding with the output layer")
    norm_eps: float = _doc(1e-5, "epsilon of the norm layers")
    rope_theta: float = _doc(10000.0, "RoPE base frequency")
    init: Literal["gpt2", "seed"] = _doc(
        "gpt2", "weight init: gpt2 = N(0, init_std), residual projections scaled by 1/sqrt(2L); "
        "seed = PyTorch's defaults as the tutorial had them (N(0, 1) embeddings, "
        "Kaiming-uniform linears)")
    init_std: float = _doc(0.02, "std of the gpt2 init; residual projections are scaled down")

    @property
    def head_bias(self) -> bool:
        """Whether the output layer has a bias (`output_bias: auto` follows `bias`)."""
        return self.bias if self.output_bias == "auto" else bool(self.output_bias)

    @property
    def ffn_width(self) -> int:
        """The feed-forward hidden width that `ffn_hidden: auto` stands for."""
        if self.ffn_hidden != "auto":
            return int(self.ffn_hidden)
        if self.activation == "swiglu":  # same parameters as a 4x two-matrix FFN, as Llama does
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


@dataclass
class TrainConfig:
    batch_size: int = _doc(12, "sequences per optimizer micro-step")
    grad_accum: int = _doc(1, "micro-steps accumulated per optimizer step")
    max_iters: int = _doc(20000, "optimizer steps")
    max_tokens: int | None = _doc(None, "stop after this many training tokens (optional)")
    max_time: float | None = _doc(None, "stop after this many seconds (optional)")
    lr: float = _doc(1e-3, "peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine"] = _doc(
        "constant", "constant (the seed's) or linear warmup + cosine decay to min_lr"
    )
    warmup_iters: int = _doc(0, "linear warmup steps")
    min_lr: float = _doc(0.0, "floor of the cosine schedule")
    weight_decay: float = _doc(
        0.01, "decoupled weight decay, applied to matrices only (seed: 0.01 on every parameter)")
    beta1: float = _doc(0.9, "AdamW beta1")
    beta2: float = _doc(0.999, "AdamW beta2")
    grad_clip: float = _doc(1.0, "clip the gradient norm to this (0 = off; seed: none)")
    eval_interval: int = _doc(50, "evaluate every this many steps")
    eval_iters: int = _doc(20, "batches per split averaged at each evaluation")
    log_interval: int = _doc(10, "record training metrics every this many steps")
    checkpoint_interval: int = _doc(1000, "save a checkpoint every this many steps")
    keep_last: int = _doc(3, "step checkpoints kept (the best by validation loss is kept too)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _doc(
        "auto", "auto = bf16 autocast on CUDA, fp32 elsewhere"
    )
    compile: bool = _doc(False, "wrap the model in torch.compile")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = _doc(
        "default", "torch.compile's mode, with compile: true; reduce-overhead replays CUDA "
        "graphs (fewer kernel launches: for small models on a GPU), max-autotune also searches "
        "matrix-product kernels (minutes of compiling)")
    parallel: Literal["ddp", "fsdp"] = _doc(
        "ddp", "with several processes: ddp = a full copy per process; fsdp = FSDP2, weights, "
        "gradients and AdamW state sharded across processes (for models that do not fit one "
        "device); one process trains plainly either way"
    )
    activation_checkpointing: bool = _doc(
        False, "recompute each block's activations in backward: less memory, ~1/3 more compute")
    seed: int = _doc(1337, "random seed (the seed's)")
    tracker: Literal["none", "tensorboard"] = _doc("none", "extra metrics logger")


@dataclass
class FinetuneConfig:
    init: str | None = _doc(None, "checkpoint file or run directory to start from")
    template: str = _doc(
        "alpaca", f"prompt template: {', '.join(repr(name) for name in TEMPLATES)} or a string "
        "with {instruction} and {input}"
    )
    train_on_prompt: bool = _doc(False, "also train on prompt tokens (default: answers only)")
    packing: bool = _doc(False, "pack several records into one context instead of padding")


@dataclass
class LoraConfig:
    rank: int = _doc(0, "LoRA rank; 0 = full fine-tuning")
    alpha: float = _doc(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = _doc(0.05, "dropout on the LoRA input")
    targets: list[str] = _doc(
        ["qkv", "proj"], "layers to adapt: qkv, proj (attention output), ffn_in, ffn_out, "
        "head (the output layer)"
    )


@dataclass
class GenerateConfig:
    strategy: Literal["greedy", "sample", "beam"] = _doc("sample", "decoding strategy")
    max_new_tokens: int = _doc(100, "tokens to generate")
    temperature: float = _doc(1.0, "softmax temperature (0 = greedy)")
    top_k: int | None = _doc(None, "keep the k most likely tokens")
    top_p: float | None = _doc(None, "keep the smallest set with this total probability")
    min_p: float | None = _doc(None, "drop tokens below min_p × the top probability")
    repetition_penalty: float = _doc(1.0, "divide logits of seen tokens (>1 discourages repeats)")
    num_beams: int = _doc(4, "beams for beam search")
    length_penalty: float = _doc(1.0, "beam score = sum log p / length^length_penalty")
    no_repeat_ngram_size: int = _doc(0, "forbid repeating n-grams of this size (0 = off)")
    window: Literal["slide", "crop"] = _doc(
        "slide", "past the context: slide = restart from the last 3/4 of the context (cache "
        "reused in between); crop = the last context_length tokens at every step (the seed's)")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "lora": LoraConfig,
    "generate": GenerateConfig,
}


@dataclass(frozen=True)
class Bound:
    """An allowed interval; `ends` says which ends are included: "[]", "(]", "[)" or "()"."""

    lo: float
    hi: float
    ends: str = "[]"
    zero: bool = False  # 0 is allowed too, as a switch (a temperature of 0 means greedy)

    def __contains__(self, value: float) -> bool:
        if self.zero and value == 0:
            return True
        above = self.lo < value if self.ends[0] == "(" else self.lo <= value
        return above and (value < self.hi if self.ends[1] == ")" else value <= self.hi)

    def __str__(self) -> str:
        interval = f"{self.ends[0]}{_num(self.lo)}, {_num(self.hi)}{self.ends[1]}"
        return f"0 or {interval}" if self.zero else interval


# The one table of allowed values: generous, but each bound keeps a typo (1e20, .nan, a batch of
# 10^8) from hanging, overflowing or allocating terabytes before anything fails. Every int and
# float key of every section has a row (a test checks); None and 'auto' skip the check.
LIMITS: dict[str, Bound] = {
    "data.val_fraction": Bound(0, 1, "()"),  # training measures held-out loss: never 0
    "model.vocab_size": Bound(1, 10_000_000),
    "model.context_length": Bound(1, 1_048_576),
    "model.d_model": Bound(1, 65_536),
    "model.num_blocks": Bound(1, 1024),
    "model.num_heads": Bound(1, 65_536),  # and it must divide d_model
    "model.dropout": Bound(0, 1, "[)"),
    "model.ffn_hidden": Bound(1, 1_048_576),
    "model.norm_eps": Bound(0, 1, "(]"),
    "model.rope_theta": Bound(1, 1e9),  # far below 1, float32 powers of it give inf and NaN
    "model.init_std": Bound(0, 10, "(]"),
    "train.batch_size": Bound(1, 65_536),
    "train.grad_accum": Bound(1, 65_536),
    "train.max_iters": Bound(1, 10**9),
    "train.max_tokens": Bound(1, 10**15),
    "train.max_time": Bound(0, 1e8, "(]"),  # seconds, about 3 years
    "train.lr": Bound(0, 10, "(]"),
    "train.warmup_iters": Bound(0, 10**9),
    "train.min_lr": Bound(0, 10),  # and at most train.lr
    "train.weight_decay": Bound(0, 10),
    "train.beta1": Bound(0, 1, "[)"),
    "train.beta2": Bound(0, 1, "[)"),
    "train.grad_clip": Bound(0, 1e6),
    "train.eval_interval": Bound(1, 10**9),
    "train.eval_iters": Bound(1, 100_000),
    "train.log_interval": Bound(1, 10**9),
    "train.checkpoint_interval": Bound(1, 10**9),
    "train.keep_last": Bound(1, 10_000),
    "train.seed": Bound(0, 2**63 - 1),  # torch.manual_seed's range
    "lora.rank": Bound(0, 4096),
    "lora.alpha": Bound(0, 1e6, "(]"),
    "lora.dropout": Bound(0, 1, "[)"),
    "generate.max_new_tokens": Bound(1, 1_000_000),
    # 0 = greedy; below 0.01 sampling is greedy in all but name (logits 0.1 apart differ 10x)
    "generate.temperature": Bound(0.01, 100, zero=True),
    "generate.top_k": Bound(0, 10_000_000),
    "generate.top_p": Bound(0, 1, "(]"),
    "generate.min_p": Bound(0, 1),
    "generate.repetition_penalty": Bound(0.01, 100),
    "generate.num_beams": Bound(1, 256),
    "generate.length_penalty": Bound(-10, 10),
    "generate.no_repeat_ngram_size": Bound(0, 1024),
}
MAX_ELEMENTS = 2**40  # 4 TiB of fp32: no tensor or model this large fits in any memory
MAX_NAME = 100


def _num(value: float) -> str:
    """1_048_576 and 1e-5 as a recipe would spell them: ints with _, floats short."""
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    return f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 4


def _quote(text: str) -> str:
    """A user's string on one line: quoted, escaped (no raw newlines), at most 120 characters."""
    text = repr(text)
    return text if len(text) <= 120 else f"{text[:100]}...{text[-10:]}"


def _show(value: Any) -> str:
    """A short one-line repr of any input, even a 5000-digit integer or a billion-laughs list."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        try:
            return f"{value:.6g}".replace("e+", "e")
        except OverflowError:
            return f"{'-' if value < 0 else ''}2^{value.bit_length() - 1} or so"
    if isinstance(value, float):
        return repr(value).replace("e+", "e")
    return _repr.repr(value)


@dataclass
class Recipe:
    name: str = "recipe"
    path: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # "section.key" -> "default" | "file" | "override"
    provenance: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # "section.key" -> the `section.key=value` argument that set it, as typed: errors name it
    override_items: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, section by section (stored in every checkpoint)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps({"name": self.name, **self.to_dict()}, sort_keys=True)

    def rows(self) -> list[tuple[str, Any, str]]:
        """(section.key, value, where it came from) for every key, for --dry-run tables."""
        table = []
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                dotted = f"{section}.{key}"
                table.append((dotted, value, self.provenance.get(dotted, "default")))
        return table


def describe_keys() -> list[tuple[str, Any, str]]:
    """(section.key, default, documentation) for every recipe key."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key, doc = f"{section}.{f.name}", f.metadata.get("doc", "")
            if key in LIMITS:
                doc = f"{doc}; allowed {LIMITS[key]}"
            elif typing.get_origin(hints[f.name]) is Literal:  # the values, not only the prose
                doc = f"{doc}; one of {', '.join(map(str, typing.get_args(hints[f.name])))}"
            rows.append((key, default, doc))
    return rows


# ---------------------------------------------------------------------------------------------
# Loading

# YAML 1.1's int and float patterns less their base-60 forms, which read `records: 10:20` as 620
# and `1:30:00` as 5400, and less its octal form, which read `num_blocks: 010` as 8 (and `018` as
# 18): a leading zero is decimal, as in YAML 1.2. The rest (0x10, 1_000, .inf, 1.5e3) as PyYAML
# reads them.
_INT = re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X)
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_MERGE = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping, which PyYAML would let the last one win silently."""

    def __init__(self, key: str, mark: yaml.Mark, first: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first.line + 1})",
                         mark)
        self.key, self.line, self.first_line = key, mark.line + 1, first.line + 1


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader for recipes and overrides: no base-60 numbers, no silently repeated keys."""

    # Copied per class (PyYAML looks the dict up on the class): SafeLoader itself is untouched.
    yaml_implicit_resolvers = {
        first: [(tag, {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}
                 .get(tag, regexp)) for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted key, for messages

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping passes here once before merge keys (`<<: *base`) are spliced into it,
        # so its own keys are checked, never the keys a merge legitimately overrides.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._check_unique(node)
        super().flatten_mapping(node)

    def _check_unique(self, node: yaml.MappingNode) -> None:
        prefix = self._paths.get(id(node))
        first: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            # Two merge keys: PyYAML lets one of them win silently, as with any other key
            key = "<<" if key_node.tag == _MERGE else self.construct_object(key_node)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key in first:
                raise _DuplicateKey(dotted, key_node.start_mark, first[key])
            first[key] = key_node.start_mark
            if isinstance(value_node, yaml.MappingNode):
                self._paths[id(value_node)] = dotted


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate; exit 2 on bad input."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        fail(f"{where}: recipe file not found; give the path of a YAML recipe such as "
             "recipes/tiny.yaml")
    if path.is_dir():
        fail(f"{where}: is a directory, not a recipe; give a YAML file such as recipes/tiny.yaml")
    check_readable(path)  # a pipe would block the read forever, every caller's
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{where}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8")
    except OSError as exc:
        fail(f"{where}: cannot be read ({exc.strerror or exc}); give a readable YAML file")
    try:
        raw = _load_yaml(text)
    except _DuplicateKey as exc:
        fail(f"{where}: line {exc.line}: duplicate key {_show(exc.key)} (first at line "
             f"{exc.first_line}); a key may appear once: keep one of them and delete the other")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError's: a character it cannot take
        if mark:
            where = f"{where}: line {mark.line + 1}, column {mark.column + 1}"
        elif position is not None:
            where = f"{where}: character {position + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fail(f"{where}: YAML syntax error: {problem}; fix the YAML there")
    except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
        fail(f"{where}: {_unreadable(exc)}; a recipe is only section: key: value lines")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(f"{where}: a recipe is a mapping of sections (data:, model:, train:), "
             f"not {'a list' if isinstance(raw, list) else 'the single value ' + _show(raw)}")
    return build_recipe(raw, overrides, name=path.stem, where=where, path=str(path))


def _unreadable(exc: BaseException) -> str:
    """Why PyYAML gave up: nesting past the stack, alias bombs, 5000-digit ints, bad dates."""
    if isinstance(exc, RecursionError):
        return "YAML nested too deeply to read"
    if isinstance(exc, MemoryError):
        return "YAML too large to read (aliases expanding?)"
    text = " ".join(str(exc).split()).split(";")[0][:100] or type(exc).__name__
    return f"YAML value unreadable ({text})"


def build_recipe(
    raw: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    name: str = "recipe",
    where: str = "recipe",
    path: str | None = None,
) -> Recipe:
    """Build a validated Recipe from nested dicts (a YAML file or a checkpoint's metadata)."""
    given = raw.get("name")
    recipe = Recipe(name=check_name(name if given is None else given, where), path=path)
    for section, values in raw.items():
        if section == "name":
            continue
        if section not in SECTIONS:
            fail(f"{where}: unknown section {_show(section)}{_suggest(str(section), SECTIONS)}; "
                 f"sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            fail(f"{where}: section '{section}' must be a mapping of key: value, "
                 f"not {type(values).__name__}")
        for key, value in values.items():
            _set(recipe, section, str(key), value, where, "file")
    for item in overrides:
        section, key, value = parse_override(item)
        _set(recipe, section, key, value, f"override {_quote(item)}", "override")
        recipe.override_items[f"{section}.{key}"] = item
    validate(recipe, where)
    return recipe


def check_name(name: Any, where: str = "recipe", fix: str = "e.g. name: my-run") -> str:
    """The name picks checkpoints/<name>: it must be one safe path component, never a path."""
    if name is None or isinstance(name, bool) or not isinstance(name, (str, int, float)):
        fail(f"{where}: name: expected a string, got {_show(name)}; write e.g. name: my-run")
    huge = isinstance(name, int) and name.bit_length() > 400  # str() fails past 4300 digits
    text = _show(name) if huge else str(name)
    problem = f"is longer than {MAX_NAME} characters" if huge else name_problem(text)
    if problem:
        fail(f"{where}: name {_show(text)} {problem}; the name becomes the directory "
             f"checkpoints/<name>, so use letters, digits, - and _, {fix}")
    return text


def name_problem(text: str) -> str:
    """What keeps `text` from being a run name (one safe path component), or '' when nothing."""
    return (
        "is empty" if not text.strip()
        else f"is longer than {MAX_NAME} characters" if len(text) > MAX_NAME
        else "contains / or \\" if "/" in text or "\\" in text
        else "is . or .." if text in (".", "..")
        else "contains a control character" if any(ord(c) < 32 or ord(c) == 127 for c in text)
        else "starts with -" if text.startswith("-")
        else "is a drive or absolute path" if PureWindowsPath(text).anchor
        else ""
    )


def parse_override(item: str) -> tuple[str, str, Any]:
    """`model.dropout=0` -> ("model", "dropout", 0); the value is read as YAML, except that a
    key taking a string gets the text as typed when YAML makes something else of it: a shell
    user writing `data.records=10:` or `finetune.template={input}` means the text."""
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        fail(f"override {_quote(item)}: expected section.key=value, e.g. train.max_iters=100")
    if section not in SECTIONS:
        fail(f"override {_quote(item)}: unknown section {_quote(section)}"
             f"{_suggest(section, SECTIONS)}; sections are {', '.join(SECTIONS)}")
    try:
        value = _load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
        fail(f"override {_quote(item)}: {_unreadable(exc)}; give a plain value, e.g. "
             "train.max_iters=100")
    tp = _hints(SECTIONS[section]).get(key)
    if tp is not None and _wants_text(tp, value):
        value = text
    return section, key, value


def _type_args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _wants_text(tp: Any, value: Any) -> bool:
    """Whether a YAML value that is not a string (a mapping, a number, a bool) goes to a key
    of type `tp` as its text instead: when `tp` takes strings and none of its other types fits.
    Null stays null (the key's off value, or an error naming the expected type)."""
    args = _type_args(tp)
    if value is None or isinstance(value, str) or str not in args:
        return False
    for other in (a for a in args if a is not str):
        try:
            _coerce_to(value, other)
        except (_NoMatch, _NotFinite):
            continue
        return False  # e.g. data.source=[a, b]: a list, as YAML read it
    return True


def _set(recipe: Recipe, section: str, key: str, value: Any, where: str, origin: str) -> None:
    obj = getattr(recipe, section)
    hints = _hints(type(obj))
    if key not in hints:
        fail(f"{where}: unknown key {_show(f'{section}.{key}')}{_suggest(key, hints)}; "
             f"run `llm pretrain --keys` to list the keys")
    setattr(obj, key, _coerce(value, hints[key], where, f"{section}.{key}"))
    recipe.provenance[f"{section}.{key}"] = origin


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


class _NoMatch(Exception):
    pass


class _NotFinite(Exception):
    """A number that is NaN, ±inf or too big for a float: no type in a union can take it."""


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    try:
        return _coerce_to(value, tp)
    except _NoMatch:
        fix = "fix the value"
        if isinstance(value, dict) and str in _type_args(tp):  # template: {input} unquoted
            fix = (f"YAML reads {{...}} as a mapping: quote the value, e.g. "
                   f"{key.partition('.')[2]}: \"{_as_typed(value)}\"")
        fail(f"{where}: {key}: expected {_type_name(tp)}, got {_show(value)}; {fix}")
    except _NotFinite:
        _out_of_range(where, key, value, finite=False)


def _as_typed(mapping: dict[Any, Any]) -> str:
    """{'input': None} back to the `{input}` a user wrote, for a quoting hint."""
    items = list(mapping.items())[:4]
    try:  # str() of a 5000-digit int raises
        text = ", ".join(str(k) if v is None else f"{k}: {v}" for k, v in items)
    except ValueError:
        return "{...}"
    return f"{{{text}}}" if len(items) == len(mapping) and len(text) <= 60 else "{...}"


def _float(value: Any) -> float:
    """float(value), finite or _NotFinite; 10**400 overflows to an error, not to inf."""
    try:
        number = float(value)
    except OverflowError:
        raise _NotFinite from None
    if not math.isfinite(number):
        raise _NotFinite
    return number


def _coerce_to(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce_to(value, arg)
            except _NoMatch:
                continue
        raise _NoMatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _NoMatch
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise _NoMatch
        return [_coerce_to(v, item_type) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise _NoMatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _NoMatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and _float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            digits = value.strip().replace("_", "")
            if re.fullmatch(r"[+-]?[0-9]{1,40}", digits):  # exact, unlike a trip through float
                return int(digits)
            try:  # "1e6" and "100_000" are how people write big counts
                number = _float(digits)
            except ValueError:
                raise _NoMatch from None
            if number.is_integer():
                return int(number)
        raise _NoMatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return _float(value)
            except ValueError:
                raise _NoMatch from None
        raise _NoMatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _NoMatch
    raise _NoMatch


# ---------------------------------------------------------------------------------------------
# Validation: impossible values, named with the fix


Blame = Callable[..., str]  # the keys a message names -> where to say the bad value came from


def _blamer(recipe: Recipe, where: str) -> Blame:
    """Errors name the override that set one of their keys, else `where` (the file): the user
    must fix the command line, not the recipe, after `llm pretrain r.yaml model.d_model=0`."""
    def at(*keys: str) -> str:
        item = next((recipe.override_items[k] for k in keys if k in recipe.override_items), None)
        return where if item is None else f"override {_quote(item)}"
    return at


def validate(recipe: Recipe, where: str = "recipe") -> None:
    """Every value in its LIMITS range and consistent with the others, before any allocation."""
    at = _blamer(recipe, where)

    def bad(key: str, problem: str, *others: str) -> None:
        fail(f"{at(key, *others)}: {key}: {problem}")

    for section in ("data", "model", "train", "lora"):
        _check_ranges(getattr(recipe, section), section, at)
    check_generate(recipe.generate, where, at=at)

    m, t, d = recipe.model, recipe.train, recipe.data
    if m.d_model % m.num_heads:
        divisors = [h for h in range(1, min(m.d_model, 64) + 1) if m.d_model % h == 0]
        hint = min(divisors, key=lambda h: abs(h - m.num_heads))
        bad("model.num_heads", f"d_model {m.d_model} is not divisible by num_heads "
            f"{m.num_heads}; use a divisor of d_model such as {hint}", "model.d_model")
    if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
        bad("model.positions", f"rope needs an even head size, d_model/num_heads = "
            f"{m.d_model // m.num_heads}; change d_model or num_heads", "model.d_model",
            "model.num_heads")
    if t.min_lr > t.lr:
        bad("train.min_lr", f"{t.min_lr} is above train.lr {t.lr}; lower it", "train.lr")
    _check_sizes(recipe, at)

    if d.tokenizer not in TOKENIZER_NAMES and not HF_TOKENIZER.fullmatch(str(d.tokenizer)):
        bad("data.tokenizer", f"expected 'cl100k_base', 'bytes' or an imported 'hf-<digest>', "
            f"got {_show(d.tokenizer)}; fix the value")
    if d.records is not None:
        parse_records(d.records, at("data.records"))
    if isinstance(d.source, list) and not 1 <= len(d.source) <= 1000:
        bad("data.source", f"a list of 1 to 1000 sources, got {len(d.source)}; name the corpus "
            "files, e.g. [builtin, ../shared/data/alpaca_en_demo.json]")
    # An empty path is the current folder to pathlib: every text file under it, a corpus
    # nobody meant.
    if any(not str(source).strip() for source in d.sources):
        bad("data.source", "an empty name, which would read the current folder; name a file, "
            "folder or preset, e.g. builtin")
    if recipe.finetune.init is not None and not str(recipe.finetune.init).strip():
        bad("finetune.init", "an empty path, which would be the current folder; name a "
            "checkpoint file or run directory, or null to train from the recipe's model")
    problem = template_problem(recipe.finetune.template)
    if problem is not None:
        bad("finetune.template", problem)
    known = ("qkv", "proj", "ffn_in", "ffn_out", "head")
    for target in recipe.lora.targets:
        if target not in known:
            bad("lora.targets", f"unknown target {_show(target)}{_suggest(target, known)}; "
                f"choose from {', '.join(known)}")


def check_generate(cfg: GenerateConfig, where: str = "generate", *, at: Blame | None = None
                   ) -> None:
    """The decoding settings' ranges, for recipes and for `llm generate`'s flags alike; `at`
    names the override behind a key (a recipe's), else every error is `where`'s."""
    at = at or (lambda *_: where)
    _check_ranges(cfg, "generate", at)
    for key in ("strategy", "window"):  # choices, also when set in code or by flags, not YAML
        choices = typing.get_args(_hints(GenerateConfig)[key])
        if getattr(cfg, key) not in choices:
            fail(f"{at(f'generate.{key}')}: generate.{key}: {_show(getattr(cfg, key))} is not "
                 f"one of {', '.join(choices)}; pick one of them")


def _check_ranges(obj: Any, section: str, at: Blame) -> None:
    """Each LIMITS key of one section; also catches wrong types set in code, not via YAML."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{section}.{f.name}", getattr(obj, f.name)
        bound = LIMITS.get(key)
        if bound is None or value is None or value == "auto":
            continue
        integral = int in (typing.get_args(hints[f.name]) or (hints[f.name],))
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            fail(f"{at(key)}: {key}: expected {'an integer' if integral else 'a number'}, got "
                 f"{_show(value)}; fix the value")
        if isinstance(value, float) and not math.isfinite(value) or value not in bound:
            _out_of_range(at(key), key, value)


def _out_of_range(where: str, key: str, value: Any, finite: bool = True) -> NoReturn:
    section, _, name = key.partition(".")
    default = next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    fix = ("or leave it out (null: off)" if default is None
           else f"e.g. {default if isinstance(default, str) else _num(default)} (the default)")
    finite = finite and (not isinstance(value, float) or math.isfinite(value))
    fail(f"{where}: {key}: must be {'' if finite else 'finite and '}in {LIMITS[key]}, got "
         f"{_show(value)}; set it within that range, {fix}")


def _check_sizes(recipe: Recipe, at: Blame) -> None:
    """Products of in-range keys can still be absurd: a batch of activations, the weights."""
    m, t = recipe.model, recipe.train
    vocab = 0 if m.vocab_size == "auto" else int(m.vocab_size)
    batch, ctx, width, ffn = ("train.batch_size", "model.context_length", "model.d_model",
                              "model.ffn_hidden")
    sizes = [
        ("train.batch_size × model.context_length × max(d_model, ffn_hidden) (activations)",
         (batch, ctx, width, ffn), t.batch_size * m.context_length * max(m.d_model, m.ffn_width)),
        ("train.batch_size × model.context_length × model.vocab_size (logits)",
         (batch, ctx, "model.vocab_size"), t.batch_size * m.context_length * vocab),
        ("train.batch_size × model.num_heads × model.context_length² (attention scores)",
         (batch, "model.num_heads", ctx), t.batch_size * m.num_heads * m.context_length ** 2),
        ("model.vocab_size × model.d_model (embedding)", ("model.vocab_size", width),
         vocab * m.d_model),
        ("model.num_blocks × model.d_model × (4·d_model + 3·ffn_hidden) (weights)",
         ("model.num_blocks", width, ffn),
         m.num_blocks * m.d_model * (4 * m.d_model + 3 * m.ffn_width)),
    ]
    for names, keys, size in sizes:
        if size >= MAX_ELEMENTS:
            fail(f"{at(*keys)}: {names} = {size:.2e} elements, at least {MAX_ELEMENTS:.2e} (4 TiB "
                 "of fp32), which no machine can hold; lower these keys")


def parse_records(spec: str, where: str = "recipe") -> slice:
    """'1000:5001' -> slice(1000, 5001); the seed's record range, as a Python slice."""
    parts = str(spec).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        fail(f"{where}: data.records: expected 'start:stop' such as '1000:5001', got "
             f"{_quote(str(spec))}; give a record range, either end may be left out: '10:'")
    if start is not None and stop is not None and 0 <= stop <= start:
        fail(f"{where}: data.records: {_quote(str(spec))} selects no record (stop is not after "
             f"start); give a range such as '{start}:{start + 1000}'")
    return slice(start, stop)
