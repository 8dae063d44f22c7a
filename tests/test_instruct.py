"""Instruction data: templates, the loss mask, record problems, truncation, packing, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcli.console import UserError
from llmcli.constants import IGNORE_INDEX
from llmcli.data.instruct import (
    STOP_TEXTS,
    InstructBatches,
    ModelVocab,
    answer_end,
    build_rows,
    encode_records,
    split_examples,
)
from llmcli.data.templates import ALPACA, render_prompt

SHORT = "Q: {instruction}\n\nContext: {input}\n\nA: "


@pytest.fixture(scope="module")
def tok():
    from llmcli.data.tokenizer import get_tokenizer

    return get_tokenizer("bytes")


@pytest.fixture(scope="module")
def cl100k():
    from llmcli.data.tokenizer import get_tokenizer

    return get_tokenizer("cl100k_base")


def rec(instruction: str, output: str, input: str = "") -> dict:  # noqa: A002
    return {"instruction": instruction, "input": input, "output": output}


def test_alpaca_prompt_with_and_without_input():
    with_input = render_prompt("alpaca", "Add the numbers.", "2 and 3")
    assert with_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3"
        "\n\n### Response:\n")
    without = render_prompt("alpaca", "Say hi.")
    assert "### Input" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert render_prompt(ALPACA, "Say hi.") == without  # the stored text renders the same


def test_custom_template_and_braces_in_text():
    assert render_prompt(SHORT, "Use {input} literally", "x") == (
        "Q: Use {input} literally\n\nContext: x\n\nA: ")
    assert render_prompt(SHORT, "json {\"a\": 1}") == "Q: json {\"a\": 1}\n\nA: "
    # a template that keeps instruction and input in one paragraph keeps it whole
    assert render_prompt("{instruction} {input} ->", "hi") == "hi  ->"
    with pytest.raises(UserError, match=r"\{instruction\}"):
        render_prompt("no fields here", "hi")
    assert render_prompt("{instruction} {json: 1} {} ->", "hi") == "hi {json: 1} {} ->"


@pytest.mark.parametrize("template", ["{instruction} {inputs}", "{instruction} {output}",
                                      "{Instruction} {instruction}"])
def test_a_template_field_other_than_instruction_and_input_is_refused(template):
    with pytest.raises(UserError, match=r"unknown field \{\w+\}; a template fills only"):
        render_prompt(template, "hi")


def test_inputs_a_template_cannot_hold_are_told(tok):
    """A template without {input} dropped every record's input without a word."""
    records = [rec("Add.", "5", "2 and 3"), rec("Name a colour.", "Blue."),
               rec("Sub.", "1", "3 and 2")]
    _, report = encode_records(records, tok, ModelVocab(257), template="Q: {instruction}\nA: ",
                               context_length=512)
    assert report.inputs_dropped == 2
    assert any("2 record(s) have an input, but the template has no {input}" in line
               for line in report.warnings(512))
    _, kept = encode_records(records, tok, ModelVocab(257), template="alpaca",
                             context_length=512)
    assert kept.inputs_dropped == 0 and not kept.warnings(512)


def test_loss_mask_covers_exactly_the_answer_and_eot(tok):
    vocab = ModelVocab(257)
    records = [rec("Name a colour.", "Blue."), rec("Add.", "5", "2 and 3")]
    examples, report = encode_records(records, tok, vocab, template="alpaca",
                                      context_length=512)
    assert report.truncated == 0 and not report.malformed
    for ex, r in zip(examples, records, strict=True):
        prompt = tok.encode(render_prompt("alpaca", r["instruction"], r["input"]))
        answer = tok.encode(r["output"])
        assert ex.ids == prompt + answer + [tok.eot_id]
        assert ex.mask == [False] * len(prompt) + [True] * (len(answer) + 1)

    # through the batch source: the targets that count are the answer then end-of-text
    train, val = build_rows(examples[:1], 512, packing=False), build_rows(examples, 512, False)
    batches = InstructBatches({"train": train, "val": val}, batch_size=1, seed=0)
    x, y = batches.get_batch("train")
    assert x.shape == y.shape == (1, 512) and x.dtype == y.dtype == torch.int64
    kept = y[y != IGNORE_INDEX].tolist()
    assert kept == tok.encode("Blue.") + [tok.eot_id]
    # each target is the token after its input position
    pos = (y[0] != IGNORE_INDEX).nonzero().flatten()
    assert x[0, pos[0]].item() == tok.encode("\n")[-1]  # the prompt's last token


def test_train_on_prompt_masks_everything_but_padding(tok):
    examples, _ = encode_records([rec("Hi.", "Yo")], tok, ModelVocab(257), template=SHORT,
                                 context_length=64, train_on_prompt=True)
    assert all(examples[0].mask)
    tokens, mask = build_rows(examples, 64, packing=False)
    n = len(examples[0].ids)
    assert mask[0, :n].all() and not mask[0, n:].any()


def test_malformed_records_reported_by_index_or_refused(tok):
    records = [rec("a", "b"), {"instruction": "no output"}, "not an object",
               rec("c", "d"), {"instruction": 3, "output": "x"}]
    examples, report = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                      context_length=64)
    assert [ex.index for ex in examples] == [0, 3]
    assert [i for i, _ in report.malformed] == [1, 2, 4]
    assert all(why for _, why in report.malformed)
    text = "\n".join(report.warnings(64))
    assert "record 1:" in text and "record 2:" in text and "record 4:" in text
    with pytest.raises(UserError, match="record 1:"):
        encode_records(records, tok, ModelVocab(257), template=SHORT, context_length=64,
                       strict=True)


def test_record_range_keeps_file_indices(tok):
    records = [rec(f"q{i}", f"a{i}") for i in range(10)] + [{"output": "x"}]
    examples, report = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                      context_length=64, records_range=slice(6, None))
    assert report.total == 11 and report.selected == 5
    assert [ex.index for ex in examples] == [6, 7, 8, 9]
    assert report.malformed[0][0] == 10


def test_truncation_and_prompts_that_fill_the_context(tok):
    records = [rec("short", "x" * 100), rec("y" * 100, "z"), rec("ok", "fine")]
    examples, report = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                      context_length=32)
    assert report.truncated == 1 and report.no_room == [1]
    assert [len(ex.ids) for ex in examples][0] == 33  # context_length + 1
    assert examples[0].ids[-1] != tok.eot_id  # the cut answer lost its end
    lines = " ".join(report.warnings(32))
    assert "1 record(s) longer than the context (32 tokens) were truncated" in lines
    assert "prompt alone fills the context: 1" in lines
    with pytest.raises(UserError, match="record 1: its prompt alone"):
        encode_records(records, tok, ModelVocab(257), template=SHORT, context_length=32,
                       strict=True)


def test_packing_fills_rows_and_keeps_every_answer(tok):
    records = [rec(f"q{i}", "answer " * (i % 3 + 1)) for i in range(12)]
    examples, _ = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                 context_length=64)
    padded = build_rows(examples, 64, packing=False)
    packed = build_rows(examples, 64, packing=True)
    assert len(padded[0]) == 12 and len(packed[0]) < 12
    # the same target tokens, whichever layout (position 0 of a row is never a target)
    assert padded[1][:, 1:].sum() == packed[1][:, 1:].sum() == sum(sum(e.mask) for e in examples)
    assert (packed[0] != 0).sum() == sum(len(e.ids) for e in examples)


def test_compact_vocabulary_counts_unknown_ids(cl100k):
    known = cl100k.encode("Below is an instruction\n\n### Response:\nQ: A: Context:  Yes.")
    vocab_map = sorted(set(known) | {cl100k.eot_id})
    vocab = ModelVocab(len(vocab_map) + 1, vocab_map)
    examples, report = encode_records([rec("Zyzzyva quokka?", "Yes.")], cl100k, vocab,
                                      template=SHORT, context_length=64)
    assert report.unknown_tokens > 0
    assert max(examples[0].ids) <= len(vocab_map)
    assert examples[0].ids[-1] == vocab_map.index(cl100k.eot_id)
    assert "outside the base model's compact vocabulary" in " ".join(report.warnings(64))


def test_vocabulary_without_end_of_text_ends_answers_with_a_stop_text(cl100k):
    vocab = ModelVocab(100256)  # the seed's scifi model
    ids, stop = answer_end(cl100k, vocab)
    assert stop == "<|endoftext|>" == STOP_TEXTS[0] and ids == cl100k.encode(stop)
    ids, stop = answer_end(cl100k, ModelVocab(100277))
    assert ids == [cl100k.eot_id] and stop is None
    # a compact vocabulary from one document: no end-of-text, and not every stop text fits
    pieces = cl100k.encode("<|end|>") + cl100k.encode("hello")
    vocab_map = sorted(set(pieces))
    ids, stop = answer_end(cl100k, ModelVocab(len(vocab_map) + 1, vocab_map))
    assert stop == "<|end|>" and ids == [vocab_map.index(i) for i in cl100k.encode(stop)]
    # a vocabulary too small even for the stop texts' tokens is refused in one line
    with pytest.raises(UserError, match="neither end-of-text"):
        answer_end(cl100k, ModelVocab(20))


def test_unknown_and_out_of_range_ids(tok, cl100k):
    # compact: a bytes model that knew only ids below 120 and end-of-text
    vocab = ModelVocab(122, [*range(120), tok.eot_id])
    examples, report = encode_records([rec("zz", "zz")], tok, vocab, template="{instruction}",
                                      context_length=64)
    assert report.unknown_tokens == 4 and examples[0].ids[-1] == 120
    # full: ids past the base vocabulary (a `vocab_size: auto` model) are a record problem
    small = ModelVocab(15_000)
    records = [rec("hi", "quokka"), rec("Zyzzyva", "hi")]
    examples, report = encode_records(records, cl100k, small, template="{instruction}",
                                      context_length=64)
    assert [e.index for e in examples] == [0]
    assert report.malformed[0][0] == 1 and "outside the base model's vocabulary" in (
        report.malformed[0][1])
    with pytest.raises(UserError, match="record 1: token id"):
        encode_records(records, cl100k, small, template="{instruction}", context_length=64,
                       strict=True)


def test_split_is_seeded_and_disjoint(tok):
    records = [rec(f"q{i}", f"a{i}") for i in range(50)]
    examples, _ = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                 context_length=64)
    train, val = split_examples(examples, 0.1, seed=3)
    again = split_examples(examples, 0.1, seed=3)
    assert [e.index for e in train] == [e.index for e in again[0]]
    assert len(val) == 5 and not {e.index for e in train} & {e.index for e in val}
    with pytest.raises(UserError, match="at least 2"):
        split_examples(examples[:1], 0.1, seed=3)


def test_batches_cover_each_epoch_and_resume_exactly(tok):
    records = [rec(f"q{i}", f"answer {i}") for i in range(10)]
    examples, _ = encode_records(records, tok, ModelVocab(257), template=SHORT,
                                 context_length=48)
    rows = build_rows(examples, 48, packing=False)
    source = InstructBatches({"train": rows, "val": rows}, batch_size=4, seed=1)
    assert source.tokens_per_batch == 4 * 48
    seen = torch.cat([source.get_batch("train")[0] for _ in range(5)])  # 20 rows = 2 epochs
    first, second = seen[:10], seen[10:]
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(first) == key(second) == key(torch.from_numpy(rows[0][:, :-1]))

    state = {k: v.clone() for k, v in source.state_dict().items()}
    expected = [source.get_batch(s) for s in ("train", "val", "train", "train")]
    fresh = InstructBatches({"train": rows, "val": rows}, batch_size=4, seed=99)
    fresh.load_state_dict(state)
    for split, (x, y) in zip(("train", "val", "train", "train"), expected, strict=True):
        x2, y2 = fresh.get_batch(split)
        assert torch.equal(x, x2) and torch.equal(y, y2)

    other = InstructBatches({"train": (rows[0][:3], rows[1][:3]), "val": rows}, 4)
    with pytest.raises(ValueError, match="same data"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="fine-tuning run"):
        other.load_state_dict({"rng.train": state["rng.train"]})
    # an altered state: a row out of range failed mid-run, a cursor past the end hung
    for key, value in [("order.train", torch.full((10,), 99)),
                       ("cursor.train", torch.tensor([10])),
                       ("order.train", torch.tensor(3))]:
        with pytest.raises(ValueError, match=key.replace(".", "\\.")):
            fresh.load_state_dict({**state, key: value})


def test_shared_alpaca_files_encode(shared_data, cl100k):
    from llmcli.data.records import read_records

    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        records = read_records(shared_data / name)
        examples, report = encode_records(records, cl100k, ModelVocab(100277),
                                          template="alpaca", context_length=128,
                                          records_range=slice(0, 200))
        assert report.selected == 200 and not report.malformed
        assert len(examples) + len(report.no_room) == 200
        assert report.truncated > 0  # many Alpaca answers exceed 128 tokens
        assert all(1 <= len(e.ids) <= 129 and any(e.mask) for e in examples)
        assert np.mean([sum(e.mask) for e in examples]) > 10


def test_records_without_any_text_are_skipped_as_empty(tok):
    """A file of empty records fine-tuned on end-of-text alone, while `llm tokenize` refused it."""
    records = [rec("", ""), rec("Name a colour.", "Blue."), rec("  ", "", " ")]
    examples, report = encode_records(records, tok, ModelVocab(257), template="alpaca",
                                      context_length=512)
    assert [ex.index for ex in examples] == [1]
    assert [i for i, _ in report.malformed] == [0, 2]
    assert "is empty" in report.malformed[0][1]
