"""Recipes: defaults, files, overrides, provenance and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.console import UserError
from llmcli.recipe import (
    Recipe,
    build_recipe,
    describe_keys,
    load_recipe,
    parse_override,
    parse_records,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_recipes_load_with_the_seeds_values():
    scifi = load_recipe(ROOT / "recipes" / "scifi.yaml")
    m, t = scifi.model, scifi.train
    assert (m.vocab_size, m.context_length, m.d_model, m.num_blocks, m.num_heads) == (
        100256, 128, 512, 12, 8)
    assert (m.dropout, t.batch_size, t.lr, t.max_iters) == (0.1, 12, 1e-3, 20000)
    assert (t.eval_interval, t.eval_iters, t.seed) == (50, 20, 1337)
    sales = load_recipe(ROOT / "recipes" / "sales.yaml")
    assert sales.model.vocab_size == "auto"
    assert (sales.model.context_length, sales.model.d_model, sales.model.num_blocks) == (16, 64, 8)
    assert (sales.model.num_heads, sales.train.batch_size, sales.train.max_iters) == (4, 4, 5000)
    fine = load_recipe(ROOT / "recipes" / "scifi-finetune.yaml")
    assert (fine.train.batch_size, fine.model.context_length) == (8, 128)
    assert fine.train.max_iters == 1000
    assert (fine.train.lr, fine.train.eval_interval, fine.train.eval_iters) == (1e-4, 10, 10)
    for path in (ROOT / "recipes").glob("*.yaml"):
        assert isinstance(load_recipe(path), Recipe), path


def test_every_key_has_a_default_and_a_doc():
    rows = describe_keys()
    assert len(rows) > 40
    for key, _default, doc in rows:
        assert doc, f"{key} has no documentation"


def test_the_template_key_lists_every_named_template():
    """--keys named 'alpaca' only, though the tiny recipes use 'alpaca-short'."""
    from llmcli.data.templates import TEMPLATES

    doc = {key: doc for key, _, doc in describe_keys()}["finetune.template"]
    assert all(repr(name) in doc for name in TEMPLATES) and "alpaca-short" in doc


def test_defaults_and_provenance(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  d_model: 256\n"), ["train.max_iters=7"])
    assert recipe.model.d_model == 256 and recipe.train.max_iters == 7
    assert recipe.model.num_blocks == 12  # default
    origins = {key: origin for key, _, origin in recipe.rows()}
    assert origins["model.d_model"] == "file"
    assert origins["train.max_iters"] == "override"
    assert origins["model.num_blocks"] == "default"
    assert recipe.name == "r"


def test_overrides_are_yaml_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, ""), [
        "train.max_iters=100", "model.dropout=0", "train.lr=3e-4", "model.tie_embeddings=true",
        "data.records=1000:5001", "lora.targets=[qkv, ffn_out]", "train.max_time=null",
        "model.vocab_size=auto",
    ])
    assert recipe.train.max_iters == 100
    assert recipe.model.dropout == 0.0 and isinstance(recipe.model.dropout, float)
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.model.tie_embeddings is True
    assert recipe.data.records == "1000:5001"
    assert recipe.lora.targets == ["qkv", "ffn_out"]
    assert recipe.model.vocab_size == "auto"


def test_yaml_1e_notation_in_files_is_a_number(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-3\n  max_tokens: 1e6\n"))
    assert recipe.train.lr == 1e-3 and recipe.train.max_tokens == 1_000_000


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ("model:\n  d_modle: 64\n", (), "unknown key 'model.d_modle' (did you mean 'd_model'?)"),
    ("modle:\n  d_model: 64\n", (), "unknown section 'modle' (did you mean 'model'?)"),
    ("", ("train.lerning_rate=1",), "unknown key 'train.lerning_rate'"),
    ("", ("train.lr",), "expected section.key=value"),
    ("model:\n  d_model: big\n", (), "model.d_model: expected an integer, got 'big'"),
    ("model:\n  dropout: [1]\n", (), "model.dropout: expected a number"),
    ("model:\n  tie_embeddings: 3\n", (), "expected true/false"),
    ("model:\n  positions: absolute\n", (), "'sinusoidal' or 'learned' or 'rope'"),
    ("model:\n  num_heads: 7\n", (), "d_model 512 is not divisible by num_heads 7"),
    ("model:\n  d_model: 0\n", (), "model.d_model: must be in [1, 65_536], got 0; set it within "
     "that range, e.g. 512 (the default)"),
    ("model:\n  num_blocks: -2\n", (), "model.num_blocks: must be in [1, 1024], got -2"),
    ("model:\n  dropout: 1.0\n", (), "model.dropout: must be in [0, 1), got 1.0"),
    ("model:\n  dropout: -0.1\n", (), "model.dropout: must be in [0, 1)"),
    ("train:\n  batch_size: 0\n", (), "train.batch_size: must be in [1, 65_536], got 0"),
    ("data:\n  val_fraction: 1.5\n", (), "data.val_fraction: must be in (0, 1)"),
    ("data:\n  records: 'abc'\n", (), "data.records: expected 'start:stop'"),
    ("generate:\n  top_p: 1.5\n", (), "generate.top_p: must be in (0, 1]"),
    ("lora:\n  targets: [qvk]\n", (), "unknown target 'qvk' (did you mean 'qkv'?)"),
    ("model:\n  positions: rope\n  d_model: 24\n  num_heads: 8\n", (), "rope needs an even"),
    ("- just\n- a list\n", (), "a recipe is a mapping of sections"),
    ("42\n", (), "(data:, model:, train:), not the single value 42"),  # was "not a int"
    ("model:\n  d_model: 32\n\x00\n", (), ": character 22: YAML syntax error"),  # was "r.yaml::"
    ("model: 5\n", (), "section 'model' must be a mapping"),
])
def test_bad_recipes_give_one_line_naming_file_key_and_fix(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    message = error_of(path, overrides)
    assert expected in message
    assert message.startswith(str(path)) or message.startswith("override")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 64\n  num_heads: [4\ntrain:\n  lr: 1\n")
    message = error_of(path)
    assert "YAML syntax error" in message and "line " in message
    assert message.startswith(f"{path}: line 4")


def test_missing_file_and_directory(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "absent.yaml")
    assert "is a directory" in error_of(tmp_path)


def test_parse_override_reads_yaml():
    assert parse_override("model.dropout=0") == ("model", "dropout", 0)
    assert parse_override("generate.top_k=null") == ("generate", "top_k", None)


def test_build_recipe_round_trips_through_to_dict():
    recipe = build_recipe({"model": {"d_model": 64, "num_heads": 4}}, ["train.max_iters=3"])
    again = build_recipe({"name": recipe.name, **recipe.to_dict()})
    assert again.to_dict() == recipe.to_dict()


def test_cli_reports_recipe_errors_in_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, "model:\n  num_heads: 7\n")
    result = CliRunner().invoke(app, ["params", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not divisible by num_heads 7" in lines[0]


# ---------------------------------------------------------------------------------------------
# YAML 1.1's base-60 numbers, string keys given by override, blame, duplicate keys


def test_colon_numbers_are_text_not_base_60(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  records: 10:30\n"))
    assert recipe.data.records == "10:30"  # YAML 1.1 reads 630
    for spec, span in [("10:20", slice(10, 20)), ("1:5", slice(1, 5)), ("10:", slice(10, None)),
                       (":30", slice(None, 30))]:
        recipe = load_recipe(write(tmp_path, ""), [f"data.records={spec}"])
        assert recipe.data.records == spec and parse_records(recipe.data.records) == span
    assert "train.max_iters: expected an integer, got '10:20'" in error_of(
        write(tmp_path, ""), ("train.max_iters=10:20",))  # not 620 iterations
    assert "train.max_time: expected a number or null, got '1:30:00'" in error_of(
        write(tmp_path, "train:\n  max_time: 1:30:00\n"))
    assert yaml.safe_load("a: 10:20") == {"a": 620}  # PyYAML's own loader left as it was


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ('data:\n  source: ""\n', (), "data.source: an empty name, which would read the current"),
    ("data:\n  source: ' '\n", (), "data.source: an empty name"),
    ('data:\n  source: [builtin, ""]\n', (), "data.source: an empty name"),
    ("", ('data.source=""',), "data.source: an empty name"),
    ('finetune:\n  init: ""\n', (), "finetune.init: an empty path"),
    ("", ("finetune.init=''",), "finetune.init: an empty path"),
])
def test_an_empty_path_key_is_refused_not_read_as_the_current_folder(tmp_path, text, overrides,
                                                                      expected):
    """`data.source: ""` trained on every text file under the current folder."""
    assert expected in error_of(write(tmp_path, text), overrides)


def test_a_record_range_that_selects_nothing_is_refused(tmp_path):
    assert "data.records: '10:5' selects no record" in error_of(
        write(tmp_path, ""), ("data.records=10:5",))
    assert "selects no record" in error_of(write(tmp_path, "data:\n  records: '7:7'\n"))
    assert parse_records("-5:") == slice(-5, None)  # the last five: still allowed


def test_a_leading_zero_is_decimal_not_octal(tmp_path):
    """YAML 1.1 read `010` as 8 (and `018`, no octal, as 18): a silently different model."""
    recipe = load_recipe(write(tmp_path, "model:\n  d_model: 0100\n  num_heads: 04\n"),
                         ["model.num_blocks=010", "train.seed=0777"])
    assert (recipe.model.d_model, recipe.model.num_heads) == (100, 4)
    assert (recipe.model.num_blocks, recipe.train.seed) == (10, 777)


@pytest.mark.parametrize(("override", "expected"), [
    ("finetune.template={instruction}", "{instruction}"),
    ("finetune.template=Q: {instruction} A:", "Q: {instruction} A:"),
    ("data.records=10:", "10:"),
    ("data.source=123", "123"),
    ("data.source=0x10", "0x10"),  # not '16'
    ("data.source=true", "true"),
    ("finetune.init=007", "007"),
    ("data.source=[a, b]", ["a", "b"]),  # a list is one of data.source's types
    ("data.records=null", None),
])
def test_string_keys_take_the_override_text_as_typed(override, expected):
    dotted, _, _ = override.partition("=")
    section, key = dotted.split(".")
    assert parse_override(override) == (section, key, expected)
    recipe = build_recipe({}, [override])
    assert getattr(getattr(recipe, section), key) == expected


def test_a_mapping_for_a_string_key_in_a_file_says_to_quote_it(tmp_path):
    message = error_of(write(tmp_path, "finetune:\n  template: {input}\n"))
    assert "finetune.template: expected a string, got {'input': None}" in message
    assert 'quote the value, e.g. template: "{input}"' in message


@pytest.mark.parametrize(("text", "override", "expected"), [
    ("", "model.d_model=0", "model.d_model: must be in [1, 65_536], got 0"),
    ("", "model.dropout=1", "model.dropout: must be in [0, 1), got 1.0"),
    ("", "train.seed=-1", "train.seed: must be in [0,"),
    ("", "lora.rank=-1", "lora.rank: must be in [0, 4096], got -1"),
    ("", "data.records=abc", "data.records: expected 'start:stop'"),
    ("", "data.tokenizer=gpt9", "data.tokenizer: expected 'cl100k_base'"),
    ("", "lora.targets=qvk", "lora.targets: unknown target 'qvk'"),
    ("", "generate.top_p=2", "generate.top_p: must be in (0, 1]"),
    ("", "generate.temperature=1e-5", "must be in 0 or [0.01, 100], got 1e-05"),
    ("", "finetune.template={instruction} {inputs}", "unknown field {inputs}"),
    ("model:\n  num_heads: 4\n", "model.d_model=30", "d_model 30 is not divisible by num_heads"),
    ("train:\n  min_lr: 0.01\n", "train.lr=0.001", "train.min_lr: 0.01 is above train.lr"),
    ("model:\n  context_length: 1048576\n", "train.batch_size=65536", "no machine can hold"),
])
def test_validation_errors_name_the_override_that_set_the_value(tmp_path, text, override,
                                                                 expected):
    message = error_of(write(tmp_path, text), ("train.max_iters=5", override))
    assert message.startswith(f"override '{override}': ") and expected in message


def test_validation_errors_of_file_values_still_name_the_file(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 0\n")
    message = error_of(path, ("train.max_iters=5", "model.dropout=0"))
    assert message.startswith(f"{path}: model.d_model: must be in [1, 65_536], got 0")


@pytest.mark.parametrize(("text", "expected"), [
    ("model:\n  d_model: 32\n  num_heads: 4\n  d_model: 64\n",
     "line 4: duplicate key 'model.d_model' (first at line 2)"),
    ("train:\n  lr: 0.1\nmodel:\n  d_model: 64\ntrain:\n  max_iters: 3\n",
     "line 5: duplicate key 'train' (first at line 1)"),
    ("model: {d_model: 64, 'd_model': 32}\n", "line 1: duplicate key 'model.d_model'"),
    ("model:\n  <<: {num_blocks: 2}\n  <<: {num_blocks: 7}\n",  # one of them won silently
     "line 3: duplicate key 'model.<<' (first at line 2)"),
])
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {expected}") and "delete the other" in message


def test_merge_keys_may_still_override_what_they_merge(tmp_path):
    text = "generate: {<<: {top_k: 5, num_beams: 2}, top_k: 6}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert (recipe.generate.top_k, recipe.generate.num_beams) == (6, 2)


def test_cli_blames_the_override_in_one_line(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 64\n  num_heads: 4\n")
    result = CliRunner().invoke(app, ["pretrain", str(path), "model.d_model=0", "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "override 'model.d_model=0': model.d_model: must be in [1, 65_536], got 0" in lines[0]
