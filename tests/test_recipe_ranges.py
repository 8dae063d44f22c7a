"""Every numeric recipe key has a range, checked before anything is allocated (fuzzer findings)."""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcli.console import UserError
from llmcli.recipe import (
    LIMITS,
    MAX_ELEMENTS,
    SECTIONS,
    GenerateConfig,
    Recipe,
    build_recipe,
    check_generate,
    describe_keys,
    load_recipe,
)


def error_of(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    """The one-line exit-2 message, which must come quickly."""
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        build_recipe(raw, list(overrides))
    assert time.perf_counter() - start < 5  # YAML nesting takes ~1 s to hit the stack limit
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


def numeric_keys() -> set[str]:
    keys = set()
    for section, cls in SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            args = typing.get_args(tp) or (tp,)
            if int in args or float in args:
                keys.add(f"{section}.{name}")
    return keys


def test_limits_cover_every_numeric_key_and_the_defaults_fit():
    assert set(LIMITS) == numeric_keys()
    defaults = {key: default for key, default, _ in describe_keys()}
    for key, bound in LIMITS.items():
        if defaults[key] not in (None, "auto"):
            assert defaults[key] in bound, key


def test_keys_document_their_range():
    docs = {key: doc for key, _, doc in describe_keys()}
    assert docs["model.d_model"].endswith("allowed [1, 65_536]")
    assert docs["model.norm_eps"].endswith("allowed (0, 1]")


@pytest.mark.parametrize(("overrides", "expected"), [
    (("model.d_model=1e20",), "model.d_model: must be in [1, 65_536], got 1e20"),
    (("train.grad_accum=1e20",), "train.grad_accum: must be in [1, 65_536]"),
    (("train.eval_iters=1e20",), "train.eval_iters: must be in [1, 100_000]"),
    (("train.batch_size=100000000",), "train.batch_size: must be in [1, 65_536], got 100000000"),
    (("model.d_model=1000000001",), "model.d_model: must be in [1, 65_536], got 1000000001"),
    (("train.lr=.nan",), "train.lr: must be finite and in (0, 10], got nan"),
    (("train.grad_clip=.nan",), "train.grad_clip: must be finite and in [0, 1e6], got nan"),
    (("model.norm_eps=1e20",), "model.norm_eps: must be in (0, 1], got 1e20"),
    (("model.norm_eps=0",), "model.norm_eps: must be in (0, 1]"),
    (("model.rope_theta=.inf",), "model.rope_theta: must be finite and in [1, 1e9]"),
    (("model.rope_theta=1e-300",), "model.rope_theta: must be in [1, 1e9]"),  # made NaN
    (("model.init_std=-.inf",), "model.init_std: must be finite and in (0, 10]"),
    (("train.max_time=1e400",), "train.max_time: must be finite and in (0, 1e8]"),
    (("train.max_tokens=1e400",), "train.max_tokens: must be finite and in"),
    (("train.max_tokens=inf",), "leave it out (null: off)"),
    (("train.max_iters=99999999999999999999999",),
     "train.max_iters: must be in [1, 1_000_000_000], got 99999999999999991611392"[:45]),
    (("train.seed=" + "9" * 60,), "train.seed: must be in [0, 9_223_372_036_854_775_807]"),
    (("train.seed=-1",), "train.seed: must be in [0,"),
    (("train.seed=" + "9" * 5000,), "YAML value unreadable"),
    (("model.vocab_size=.nan",), "model.vocab_size: must be finite and in [1, 10_000_000]"),
    (("model.vocab_size=20000000",), "model.vocab_size: must be in [1, 10_000_000]"),
    (("model.num_blocks=2000",), "model.num_blocks: must be in [1, 1024]"),
    (("model.context_length=2000000",), "model.context_length: must be in [1, 1_048_576]"),
    (("model.ffn_hidden=1e7",), "model.ffn_hidden: must be in [1, 1_048_576]"),
    (("model.num_heads=128", "model.d_model=64"), "d_model 64 is not divisible by num_heads 128"),
    (("train.lr=11",), "train.lr: must be in (0, 10], got 11.0; set it within that range, "
     "e.g. 0.001 (the default)"),
    (("train.min_lr=0.1",), "train.min_lr: 0.1 is above train.lr 0.001"),
    (("train.weight_decay=100",), "train.weight_decay: must be in [0, 10]"),
    (("train.grad_clip=1e7",), "train.grad_clip: must be in [0, 1e6]"),
    (("train.warmup_iters=2e9",), "train.warmup_iters: must be in [0, 1_000_000_000]"),
    (("train.keep_last=20000",), "train.keep_last: must be in [1, 10_000]"),
    (("train.beta2=1",), "train.beta2: must be in [0, 1)"),
    (("lora.rank=5000",), "lora.rank: must be in [0, 4096]"),
    (("lora.alpha=.inf",), "lora.alpha: must be finite and in (0, 1e6]"),
    (("lora.alpha=1e7",), "lora.alpha: must be in (0, 1e6]"),
    (("data.val_fraction=.nan",), "data.val_fraction: must be finite and in (0, 1)"),
    (("data.val_fraction=0",), "data.val_fraction: must be in (0, 1)"),  # was never honoured
    (("generate.max_new_tokens=1e7",), "generate.max_new_tokens: must be in [1, 1_000_000]"),
    (("generate.temperature=1e-39",), "must be in 0 or [0.01, 100], got 1e-39"),
    (("generate.temperature=1000",), "generate.temperature: must be in 0 or [0.01, 100]"),
    (("generate.top_k=1e8",), "generate.top_k: must be in [0, 10_000_000]"),
    (("generate.num_beams=1000",), "generate.num_beams: must be in [1, 256]"),
    (("generate.length_penalty=.nan",), "generate.length_penalty: must be finite and in [-10, 10]"),
    (("generate.length_penalty=-11",), "generate.length_penalty: must be in [-10, 10]"),
    (("generate.repetition_penalty=0",), "generate.repetition_penalty: must be in [0.01, 100]"),
    (("generate.repetition_penalty=1e9",), "generate.repetition_penalty: must be in [0.01, 100]"),
    (("generate.no_repeat_ngram_size=5000",),
     "generate.no_repeat_ngram_size: must be in [0, 1024]"),
    (("generate.top_p=.nan",), "generate.top_p: must be finite and in (0, 1]"),
    (("generate.min_p=.inf",), "generate.min_p: must be finite and in [0, 1]"),
    (("model.d_model=" + "[" * 100_000,), "YAML nested too deeply to read"),
], ids=lambda v: v[0][:40] if isinstance(v, tuple) else "")
def test_out_of_range_values_exit_2_naming_key_range_and_fix(overrides, expected):
    assert expected in error_of({}, overrides)


@pytest.mark.parametrize(("raw", "names"), [
    ({"train": {"batch_size": 65536}, "model": {"context_length": 1_048_576}},
     "train.batch_size × model.context_length × max(d_model, ffn_hidden) (activations)"),
    ({"train": {"batch_size": 65536}, "model": {"context_length": 4096}},
     "train.batch_size × model.context_length × model.vocab_size (logits)"),
    ({"model": {"d_model": 65536, "num_heads": 64, "num_blocks": 1024}},
     "model.num_blocks × model.d_model"),
    # a raw allocator error (4 TiB) at the first step, though every key is in range
    ({"train": {"batch_size": 1}, "model": {"context_length": 1_048_576, "d_model": 2,
                                           "num_heads": 1}},
     "train.batch_size × model.num_heads × model.context_length² (attention scores)"),
])
def test_products_of_in_range_keys_are_bounded(raw, names):
    message = error_of(raw)
    assert names in message and "no machine can hold" in message


def test_check_generate_is_public_and_checks_types_and_tiny_temperatures():
    check_generate(GenerateConfig(), "llm generate")
    check_generate(GenerateConfig(temperature=0.0), "llm generate")
    check_generate(GenerateConfig(temperature=0.01), "llm generate")
    for bad, expected in [
        (GenerateConfig(temperature=1e-39), "generate.temperature: must be in 0 or [0.01, 100]"),
        (GenerateConfig(temperature=0.005), "must be in 0 or [0.01, 100], got 0.005"),
        (GenerateConfig(temperature=math.nan), "must be finite and in 0 or [0.01, 100]"),
        (GenerateConfig(num_beams=1000), "generate.num_beams: must be in [1, 256]"),
        (GenerateConfig(max_new_tokens=5.5), "generate.max_new_tokens: expected an integer"),
        (GenerateConfig(top_k=-1), "generate.top_k: must be in [0, 10_000_000], got -1"),
    ]:
        with pytest.raises(UserError) as info:
            check_generate(bad, "llm generate")
        assert str(info.value).startswith("llm generate: ") and expected in str(info.value)


@pytest.mark.parametrize(("name", "expected"), [
    ("../x", "contains / or \\"), ("a/b", "contains / or \\"), ("a\\b", "contains / or \\"),
    (".", "is . or .."), ("..", "is . or .."), ("", "is empty"), ("   ", "is empty"),
    ("a\0b", "control character"), ("a\nb", "control character"), ("/etc", "contains /"),
    ("x" * 101, "longer than 100"), ("-rf", "starts with -"), ("C:run", "drive or absolute"),
    ([1], "name: expected a string"), (True, "name: expected a string"),
])
def test_unsafe_names_are_refused(name, expected):
    message = error_of({"name": name})
    assert expected in message and "checkpoints/<name>" in message or "expected a string" in message


def test_safe_names_and_stems_are_kept(tmp_path):
    assert build_recipe({"name": "my run_1.v2"}).name == "my run_1.v2"
    assert build_recipe({"name": 7}).name == "7"
    path = tmp_path / "my recipe.yaml"
    path.write_text("name:\n", encoding="utf-8")  # null name: the file stem
    assert load_recipe(path).name == "my recipe"


def bomb(levels: int = 9) -> str:
    """Billion laughs: 9^levels strings by aliases, a few hundred bytes of YAML."""
    lines = ['  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000, "YAML nested too deeply to read"),
    ("model:\n  d_model: " + "{a: " * 50_000, "YAML nested too deeply to read"),
    ("train:\n  seed: " + "9" * 5000 + "\n", "YAML value unreadable (Exceeds the limit"),
    ("data:\n  records: 2001-13-45\n", "YAML value unreadable (month must be in 1..12)"),
    ("lora:\n  targets:\n" + bomb(), "lora.targets: expected a list of a string"),
    ("generate:\n  strategy:\n" + bomb(), "generate.strategy: expected 'greedy'"),
    ("data:\n  source:\n" + bomb(), "data.source: expected a string"),
    ("model:\n  d_model: 1e400\n", "model.d_model: must be finite and in [1, 65_536]"),
], ids=lambda v: v[:24])
def test_hostile_yaml_is_one_line(tmp_path: Path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message and len(message) < 400
    assert message.startswith(str(path)) and expected in message


# ---------------------------------------------------------------------------------------------
# Property: any value for any numeric key gives an in-range recipe or a UserError, quickly.

STRINGS = ["1e400", "-1e400", "nan", ".nan", "inf", "-.inf", "1e20", "99999999999999999999999",
           "1_000", "auto", "", " 7 ", "0x10", "1e-3", "null", "[1, 2]", "{a: 1}", "9" * 5000]
values = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    # 2^63 ± 1, 10^20, 10^400 and a 5000-digit int (Python refuses to print it: mapped, not shown)
    st.sampled_from([(2, 63), (2, 64), (10, 20), (10, 400), (10, 5000)]).flatmap(
        lambda p: st.sampled_from([p[0] ** p[1], p[0] ** p[1] - 1, -(p[0] ** p[1])])),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-39, 5e-324, 1e308, 1e-3, 0.0, -0.0]),
    st.sampled_from(STRINGS),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
)
texts = st.one_of(st.text(max_size=20), st.sampled_from(STRINGS), st.integers().map(str),
                  st.floats().map(repr))


def assert_in_range(recipe: Recipe) -> None:
    for key, bound in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is None or value == "auto":
            continue
        assert not isinstance(value, bool), key
        assert isinstance(value, (int, float)) and value in bound, (key, value)
        assert not isinstance(value, float) or math.isfinite(value), key
    m, t = recipe.model, recipe.train
    assert m.d_model % m.num_heads == 0 and t.min_lr <= t.lr
    assert t.batch_size * m.context_length * max(m.d_model, m.ffn_width) <= MAX_ELEMENTS


@settings(max_examples=200, deadline=2000)
@given(st.dictionaries(st.sampled_from(sorted(LIMITS)), values, max_size=5))
def test_any_values_give_an_in_range_recipe_or_a_user_error(assignments):
    raw: dict[str, dict[str, Any]] = {}
    for key, value in assignments.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    try:
        recipe = build_recipe(raw)
    except UserError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
        return
    assert_in_range(recipe)


@settings(max_examples=200, deadline=2000)
@given(st.sampled_from(sorted(LIMITS)), texts)
def test_any_override_text_gives_an_in_range_recipe_or_a_user_error(key, text):
    try:
        recipe = build_recipe({}, [f"{key}={text}"])
    except UserError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
        return
    assert_in_range(recipe)


@settings(max_examples=100, deadline=2000)
@given(st.one_of(st.text(max_size=120), values))
def test_any_name_is_one_safe_path_component_or_a_user_error(name):
    try:
        recipe = build_recipe({"name": name})
    except UserError:
        return
    assert recipe.name == Path(recipe.name).name and recipe.name not in ("", ".", "..")
    assert "/" not in recipe.name and "\\" not in recipe.name and "\0" not in recipe.name


def test_recipes_round_trip_after_range_checks():
    recipe = build_recipe({"model": {"d_model": 64, "num_heads": 4}, "train": {"seed": 2**63 - 1}})
    assert dataclasses.asdict(build_recipe({"name": recipe.name, **recipe.to_dict()}).train) == \
        dataclasses.asdict(recipe.train)
