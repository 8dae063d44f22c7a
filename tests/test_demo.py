"""The README's demo path on a small budget: `llm tokenize` the corpus, `llm pretrain
recipes/tiny.yaml` (which reuses that token file), `llm finetune recipes/tiny-lora.yaml --merge`,
`llm generate --instruct`. The recipes are the real ones; only the model size, the step counts
and the data (a few short instruction records built here) are made small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_train import one_thread
from typer.testing import CliRunner

from llmcli.cli import app

_threads = pytest.fixture(autouse=True)(one_thread)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = ["model.d_model=32", "model.num_heads=2", "model.num_blocks=1", "train.batch_size=8",
         "train.eval_iters=2", "train.log_interval=10"]
QUESTIONS = {"Name a colour.": "Blue.", "Name a fruit.": "An apple.", "Name a pet.": "A cat.",
             "Give a number.": "Seven.", "Name a drink.": "Water."}


def llm(*args: str):
    result = runner.invoke(app, [*args])
    assert result.exit_code == 0, result.output
    return result


def test_the_demo_path_ends_in_answers_that_stop_and_use_known_tokens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = [{"instruction": q, "input": "", "output": a}
               for _ in range(30) for q, a in QUESTIONS.items()]
    (tmp_path / "records.json").write_text(json.dumps(records))
    (tmp_path / "notes.txt").write_text("Colours, fruit, pets and drinks are things to name.\n"
                                        * 400)
    sources = ["notes.txt", "records.json"]

    tokenized = llm("tokenize", *sources)
    assert "data/notes+records.tokens" in tokenized.stdout  # the name pretraining looks for
    pretrained = llm("pretrain", str(ROOT / "recipes" / "tiny.yaml"),
                     f"data.source=[{', '.join(sources)}]", *SMALL, "train.max_iters=60",
                     "train.eval_interval=30", "train.checkpoint_interval=60", "train.lr=1e-2")
    assert "using data/notes+records.tokens" in pretrained.stderr  # reused, not tokenized again
    llm("finetune", str(ROOT / "recipes" / "tiny-lora.yaml"), "data.source=records.json",
        "train.max_iters=120", "train.eval_interval=60", "train.checkpoint_interval=120",
        "train.batch_size=8", "train.eval_iters=2", "train.lr=1e-2", "--merge")
    for question in QUESTIONS:
        result = llm("generate", "checkpoints/tiny-lora", "--instruct", question,
                     "--max-new-tokens", "20", "--json")
        assert "never appeared" not in result.stderr  # every prompt token is in the vocabulary
        finished = json.loads(result.stdout)["results"][0]
        assert finished["finish"] == "eos", (question, finished)  # a real end-of-text token
        assert finished["text"].strip() in QUESTIONS.values()  # an answer, whole
