"""`llm generate` end to end on tiny checkpoints written by the tests themselves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcli.checkpoint import save_model
from llmcli.cli import app
from llmcli.data.templates import ALPACA
from llmcli.model.gpt import build_model
from llmcli.recipe import Recipe

runner = CliRunner()


def make_checkpoint(path: Path, cfg, *, vocab_size: int = 257, generate: dict | None = None,
                    **meta) -> Path:
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg, vocab_size=vocab_size, init_std=0.3)
    recipe = Recipe(name="tiny")
    recipe.model = model_cfg
    recipe.data.tokenizer = "bytes"
    for key, value in (generate or {}).items():
        setattr(recipe.generate, key, value)
    meta.setdefault("tokenizer", "bytes")
    save_model(path, build_model(model_cfg), recipe, step=0, **meta)
    return path


@pytest.fixture
def ckpt(tmp_path, tiny_model_cfg) -> Path:
    return make_checkpoint(tmp_path / "run" / "step-00000000.safetensors", tiny_model_cfg)


def gen(*args: str, input: str | None = None):  # noqa: A002
    return runner.invoke(app, ["generate", *args], input=input)


def error_line(result) -> str:
    """The one line that reports an error (stderr may also hold the loading notice)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_greedy_streams_the_prompt_and_its_continuation(ckpt):
    result = gen(str(ckpt), "Hello", "--strategy", "greedy", "-n", "8")
    assert result.exit_code == 0, result.output
    data = as_json(gen(str(ckpt), "Hello", "--strategy", "greedy", "-n", "8", "--json"))
    assert result.stdout == "Hello" + data["results"][0]["text"] + "\n"
    assert "tokens/s" in result.stderr


def test_run_directory_means_its_latest_checkpoint(ckpt):
    newer = ckpt.parent / "step-00000010.safetensors"
    newer.write_bytes(ckpt.read_bytes())
    data = as_json(gen(str(ckpt.parent), "Hi", "-n", "2", "--json"))
    assert data["checkpoint"] == str(newer)


def test_json_has_text_token_ids_and_scores(ckpt):
    data = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "6", "--json"))
    [res] = data["results"]
    assert res["tokens"] == len(res["token_ids"]) == 6 and res["finish"] == "length"
    text_bytes = bytes(t for t in res["token_ids"] if t < 256)
    assert res["text"] == text_bytes.decode("utf-8", errors="replace")
    assert res["logprob"] < 0 and res["score"] == pytest.approx(res["logprob"] / 6)
    assert data["settings"]["strategy"] == "greedy" and data["prompt"] == "Hi"


def test_beam_search_prints_the_best_beams_with_scores(ckpt):
    result = gen(str(ckpt), "Once upon a time", "--strategy", "beam", "--num-beams", "4",
                 "-n", "6")
    assert result.exit_code == 0, result.output
    headers = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [h[:3] for h in headers] == ["[1]", "[2]", "[3]", "[4]"]
    scores = [float(h.split("score ")[1].split(",")[0]) for h in headers]
    assert scores == sorted(scores, reverse=True)
    data = as_json(gen(str(ckpt), "Once upon a time", "--strategy", "beam", "--num-beams", "4",
                       "-n", "6", "--num-return-sequences", "2", "--json"))
    assert len(data["results"]) == 2


def test_same_seed_same_text(ckpt):
    args = [str(ckpt), "Hi", "--strategy", "sample", "-n", "12", "--seed", "5", "--json"]
    first, again = as_json(gen(*args)), as_json(gen(*args))
    other = as_json(gen(*args[:-2], "6", "--json"))
    assert first["results"] == again["results"] and first["seed"] == 5
    assert first["results"][0]["token_ids"] != other["results"][0]["token_ids"]


def test_stop_string_stops_and_is_not_printed(ckpt):
    free = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "20", "--json"))
    text = free["results"][0]["text"]
    stop = text[5:7]
    data = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "20", "--stop", stop,
                       "--json"))
    [res] = data["results"]
    assert res["finish"] == "stop" and res["text"] == text[:text.index(stop)]
    streamed = gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "20", "--stop", stop)
    assert streamed.stdout == "Hi" + res["text"] + "\n"


def test_defaults_come_from_the_checkpoint_recipe(tmp_path, tiny_model_cfg):
    path = make_checkpoint(tmp_path / "b.safetensors", tiny_model_cfg,
                           generate={"strategy": "beam", "num_beams": 2, "max_new_tokens": 3})
    data = as_json(gen(str(path), "Hi", "--json"))
    assert data["strategy"] == "beam" and len(data["results"]) == 2
    assert all(r["tokens"] == 3 for r in data["results"])
    data = as_json(gen(str(path), "Hi", "--strategy", "greedy", "--json"))
    assert data["strategy"] == "greedy" and len(data["results"]) == 1


def test_show_probs_fits_80_columns_and_marks_the_choice(ckpt):
    result = gen(str(ckpt), "中文", "--strategy", "sample", "--top-k", "3", "--top-p", "0.9",
                 "-n", "4", "--seed", "1", "--show-probs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    from rich.cells import cell_len

    assert max(cell_len(line) for line in lines) <= 80
    assert sum("◀" in line for line in lines) == 4
    assert any("no: top-k" in line for line in lines)
    beam = gen(str(ckpt), "Hi", "--strategy", "beam", "--num-beams", "3", "-n", "3",
               "--show-probs")
    assert beam.exit_code == 0, beam.output
    assert max(cell_len(line) for line in beam.stdout.splitlines()) <= 80
    assert "beam 1" in beam.stdout and "dropped" in beam.stdout


def test_show_probs_json_lists_the_candidates(ckpt):
    data = as_json(gen(str(ckpt), "Hi", "--strategy", "sample", "--top-k", "2", "-n", "3",
                       "--seed", "0", "--show-probs", "--json"))
    assert len(data["steps"]) == 3
    for step in data["steps"]:
        kept = [c for c in step["candidates"] if c["removed_by"] is None]
        assert len(kept) == 2 and sum(c["p_draw"] for c in kept) == pytest.approx(1, rel=1e-4)


def test_compare_runs_each_strategy_on_the_same_prompt_and_seed(ckpt):
    data = as_json(gen(str(ckpt), "Hi", "--compare", "greedy,beam,sample", "-n", "5",
                       "--seed", "3", "--json"))
    assert [c["strategy"] for c in data["compare"]] == ["greedy", "beam", "sample"]
    greedy = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "5", "--json"))
    assert data["compare"][0]["token_ids"] == greedy["results"][0]["token_ids"]
    table = gen(str(ckpt), "Hi", "--compare", "greedy,beam", "-n", "5")
    assert table.exit_code == 0, table.output
    assert "greedy" in table.stdout and "beam" in table.stdout


def test_compare_honours_every_flag_or_says_it_is_ignored(ckpt):
    # -t 0 samples greedily, as without --compare; the settings shown are the ones that ran
    data = as_json(gen(str(ckpt), "Hi", "--compare", "greedy,sample", "-t", "0", "-n", "4",
                       "--seed", "2", "--json"))
    assert data["settings"]["temperature"] == 0 and data["seed"] is None
    assert data["compare"][0]["token_ids"] == data["compare"][1]["token_ids"]
    plain = gen(str(ckpt), "Hi", "--compare", "greedy,sample", "-t", "0", "-n", "4")
    assert "sample at temperature 0 is greedy" in plain.stderr
    # flags that no listed strategy uses are named, as for one strategy; no seed without sampling
    result = gen(str(ckpt), "Hi", "--compare", "greedy,beam", "-t", "0.5", "--top-k", "3",
                 "-s", "sample", "-n", "3")
    assert result.exit_code == 0, result.output
    assert "--strategy sample: ignored; --compare runs each strategy it lists" in result.stderr
    assert "--temperature, --top-k: --compare greedy,beam picks tokens by score" in result.stderr
    seeded = gen(str(ckpt), "Hi", "-s", "greedy", "--seed", "3", "-n", "2")
    assert "--seed: greedy search picks tokens by score, not by sampling" in seeded.stderr
    assert "seed" not in result.stderr
    beams = gen(str(ckpt), "Hi", "--compare", "greedy,sample", "--num-beams", "3", "-n", "3")
    assert "--num-beams: only beam search uses beams (this is --compare greedy,sample)" in (
        beams.stderr)
    assert "seed " in beams.stderr


def test_batch_gives_one_json_line_per_prompt(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("One\n\nTwo\n", encoding="utf-8")
    result = gen(str(ckpt), "--prompt-file", str(prompts), "--batch", "-n", "3", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["One", "Two"]


def test_prompt_from_standard_input(ckpt):
    data = as_json(gen(str(ckpt), "-n", "2", "--json", input="From stdin\n"))
    assert data["prompt"] == "From stdin"


def test_empty_prompt_starts_from_end_of_text(ckpt):
    data = as_json(gen(str(ckpt), "", "--strategy", "greedy", "-n", "3", "--json"))
    assert data["prompt"] == "" and data["results"][0]["tokens"] >= 1


def test_long_generation_slides_the_window_with_a_notice(ckpt):
    result = gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "40")  # context 16
    assert result.exit_code == 0, result.output
    assert "sliding window" in result.stderr
    cached = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "40", "--json"))
    plain = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "40", "--json",
                        "--no-cache"))
    assert cached["results"][0]["token_ids"] == plain["results"][0]["token_ids"]


def test_bf16_on_cpu(ckpt):
    data = as_json(gen(str(ckpt), "Hi", "--strategy", "greedy", "-n", "4", "--dtype", "bf16",
                       "--json"))
    assert data["results"][0]["tokens"] == 4


def test_newest_run_is_the_default_and_one_positional_can_be_the_prompt(
        tmp_path, tiny_model_cfg, monkeypatch):
    make_checkpoint(tmp_path / "checkpoints" / "tiny" / "step-00000001.safetensors",
                    tiny_model_cfg)
    monkeypatch.chdir(tmp_path)
    data = as_json(gen("Once upon", "-n", "2", "--json"))
    assert data["prompt"] == "Once upon"
    assert data["checkpoint"].endswith("step-00000001.safetensors")
    data = as_json(gen("tiny", "Hi", "-n", "2", "--json"))  # a run name under checkpoints/
    assert data["prompt"] == "Hi"


def test_a_doubtful_lone_argument_is_said_out_loud(tmp_path, tiny_model_cfg, monkeypatch):
    """A lone argument is the checkpoint or the prompt by a guess: a path that does not exist
    is refused with how to pass it as a prompt, a likely mistyped run name is warned about,
    and a prompt with spaces is a prompt even with a slash in it."""
    make_checkpoint(tmp_path / "checkpoints" / "tiny" / "step-00000001.safetensors",
                    tiny_model_cfg)
    monkeypatch.chdir(tmp_path)
    result = gen("and/or", "-n", "2")
    assert result.exit_code == 2
    assert "no such checkpoint" in error_line(result) and "llm generate RUN and/or" in \
        error_line(result)
    typo = gen("tiyn", "-n", "2", "--json")
    assert as_json(typo)["prompt"] == "tiyn"
    assert "warning: 'tiyn' is taken as the prompt" in typo.stderr and "checkpoints/tiny" in \
        typo.stderr
    assert "warning" not in gen("Once", "-n", "2").stderr
    assert as_json(gen("this and/or that", "-n", "2", "--json"))["prompt"] == "this and/or that"


# ---------------------------------------------------------------------------------------------
# Fine-tuned models


def test_instruct_renders_the_template_and_prints_only_the_answer(tmp_path, tiny_model_cfg):
    path = make_checkpoint(tmp_path / "sft.safetensors", tiny_model_cfg, template=ALPACA)
    result = gen(str(path), "--instruct", "Name a colour", "--strategy", "greedy", "-n", "5")
    assert result.exit_code == 0, result.output
    data = as_json(gen(str(path), "--instruct", "Name a colour", "--strategy", "greedy",
                       "-n", "5", "--json"))
    assert "### Instruction:\nName a colour" in data["prompt"]
    assert "### Input:" not in data["prompt"]
    assert result.stdout == data["results"][0]["text"] + "\n"
    with_input = as_json(gen(str(path), "--instruct", "Translate", "--input", "chat",
                             "-n", "2", "--json"))
    assert "### Input:\nchat" in with_input["prompt"]
    bare = make_checkpoint(tmp_path / "bare.safetensors", tiny_model_cfg,
                           template="Q: {instruction}\nA: ")
    dropped = gen(str(bare), "--instruct", "Translate", "--input", "chat", "-n", "2")
    assert dropped.exit_code == 2 and "has no {input} field" in error_line(dropped)


def test_instruct_uses_the_checkpoint_stop_string_when_end_of_text_does_not_fit(
        tmp_path, tiny_model_cfg):
    path = make_checkpoint(tmp_path / "sft.safetensors", tiny_model_cfg, vocab_size=128,
                           template=ALPACA, stop=["<|endoftext|>"])
    data = as_json(gen(str(path), "--instruct", "Hi", "-n", "2", "--json"))
    assert data["stop"] == ["<|endoftext|>"]


def test_instruct_without_a_template_is_an_error(ckpt):
    result = gen(str(ckpt), "--instruct", "Hi")
    assert result.exit_code == 2
    assert "no prompt template" in error_line(result)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "-1"], "--temperature: must be in 0 or [0.01, 100], got -1.0"),
    (["--temperature", "nan"], "--temperature: must be finite and in 0 or [0.01, 100], got nan"),
    (["--temperature", "1e-39"], "--temperature: must be in 0 or [0.01, 100], got 1e-39"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
    (["--num-beams", "0", "--strategy", "beam"], "--num-beams: must be in [1, 256], got 0"),
    (["--length-penalty", "-1000", "--strategy", "beam"], "--length-penalty: must be in [-10"),
    (["--num-return-sequences", "0"], "--num-return-sequences 0: must be in [1, 256]"),
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: must be in"),
    (["--max-new-tokens", "99999999999"], "--max-new-tokens: must be in [1, 1_000_000]"),
    (["--strategy", "nucleus"], "--strategy 'nucleus'"),
    (["--compare", "greedy,best"], "--compare 'greedy,best'"),
    (["--strategy", "beam", "--num-beams", "2", "--num-return-sequences", "3"],
     "at most --num-beams"),
    (["--input", "x"], "--input goes with --instruct"),
    (["--dtype", "fp8"], "dtype 'fp8'"),
    (["--stop", ""], "--stop '': an empty stop text"),
    (["--prompt-file", "anything.txt"], "either as PROMPT or with --prompt-file, not both"),
    (["--device", "cpu:1"], "--device cpu:1: there is one CPU device"),
])
def test_bad_knobs_are_one_line_errors(ckpt, args, message):
    result = gen(str(ckpt), "Hi", *args)
    assert result.exit_code == 2, result.output
    assert message in error_line(result)


def test_a_prompt_that_never_ends_is_refused_not_read_into_memory(ckpt, monkeypatch):
    """`-f /dev/zero` (or `yes |`) read until the kernel killed the process."""
    from llmcli import console

    result = gen(str(ckpt), "-f", "/dev/zero")
    assert result.exit_code == 2
    assert error_line(result).startswith("error: --prompt-file /dev/zero: more than 64 MiB")
    monkeypatch.setattr(console, "MAX_TEXT_INPUT", 1000)
    result = gen(str(ckpt), input="y\n" * 600)
    assert result.exit_code == 2
    assert error_line(result).startswith("error: standard input: more than 0 MiB")
    piped = gen(str(ckpt), "-n", "2", "--strategy", "greedy", input="Hi\r\n")
    assert piped.exit_code == 0, piped.output  # within the limit, lines as text mode reads them


def test_missing_checkpoint(tmp_path):
    result = gen(str(tmp_path / "nope.safetensors"), "Hi")
    assert result.exit_code == 2 and "checkpoint not found" in result.stderr


def test_no_checkpoint_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = gen("-n", "2")
    assert result.exit_code == 2 and "none found under checkpoints" in error_line(result)


def test_foreign_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    result = gen(str(path), "Hi")
    assert result.exit_code == 2 and "not an llm checkpoint" in result.stderr


def test_prompt_token_outside_the_vocabulary_is_named(tmp_path, tiny_model_cfg):
    path = make_checkpoint(tmp_path / "small.safetensors", tiny_model_cfg, vocab_size=128)
    result = gen(str(path), "café")
    assert result.exit_code == 2
    assert "prompt token '\\xc3'" in result.stderr and "vocabulary of 128" in result.stderr
    empty = gen(str(path), "")
    assert empty.exit_code == 2 and "no end-of-text token" in empty.stderr


def test_unseen_prompt_token_of_a_compact_vocabulary_reads_as_unknown(tmp_path, tiny_model_cfg):
    seen = sorted(set(b"hello world") | {256})
    path = make_checkpoint(tmp_path / "compact.safetensors", tiny_model_cfg,
                           vocab_size=len(seen) + 1, vocab_map=seen)
    ok = as_json(gen(str(path), "hello", "-n", "5", "--json"))
    assert set(ok["results"][0]["token_ids"]) <= set(seen)  # mapped back, unknown never drawn
    result = gen(str(path), "help", "-n", "3", "--json")
    assert result.exit_code == 0  # read as the unknown id, as training did, and named
    assert "1 prompt token(s) never appeared" in result.stderr and "'p'" in result.stderr


def test_cpu_0_is_the_cpu(ckpt):
    result = gen(str(ckpt), "Hi", "-n", "2", "--device", "cpu:0", "--strategy", "greedy")
    assert result.exit_code == 0, result.output


def test_a_closed_standard_input_reads_as_an_empty_pipe(monkeypatch):
    """`llm generate RUN <&-` leaves sys.stdin None: the prompt is empty, as with < /dev/null."""
    from llmcli.commands.generate import _read_prompt

    monkeypatch.setattr("sys.stdin", None)
    assert _read_prompt(None) == ""


def test_a_reader_that_closes_the_pipe_ends_generate_quietly(ckpt):
    """`llm generate ... | head -c 5`: "error: BrokenPipeError" once, for a reader who had
    what it wanted. A pipe closed before the first write makes it certain."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-m", "llmcli", "generate", str(ckpt), "Hi", "-n",
                             "20", "--strategy", "greedy"], stdout=write, stderr=subprocess.PIPE,
                            text=True, env=env, timeout=120)
    os.close(write)
    assert result.returncode == 1
    assert "error" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_padded_vocabulary_is_said_once(tmp_path, tiny_model_cfg, ckpt):
    """Ids beyond the tokenizer's are never generated, so greedy text can differ from
    transformers': said, not silent; a vocabulary that fits the tokenizer says nothing."""
    padded = make_checkpoint(tmp_path / "padded.safetensors", tiny_model_cfg, vocab_size=272)
    result = gen(str(padded), "Hi", "-n", "3", "--strategy", "greedy")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("ids 257 to 271 of the model have no text") == 1
    plain = gen(str(ckpt), "Hi", "-n", "3", "--strategy", "greedy")
    assert plain.exit_code == 0 and "padded vocabulary" not in plain.stderr
