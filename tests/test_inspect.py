"""`llm inspect`: the numbers of every view, checked against the model itself, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcli.checkpoint import base_reference, save_adapter, save_model
from llmcli.cli import app
from llmcli.console import UserError
from llmcli.inspect import embeddings as emb
from llmcli.inspect.attention import attention_maps
from llmcli.inspect.lens import logit_lens
from llmcli.inspect.norms import norm_report
from llmcli.inspect.positions import load_positions, position_table
from llmcli.inspect.score import score_text
from llmcli.inspect.tokens import open_model, prompt_ids, single_id
from llmcli.model.gpt import build_model, sinusoidal_table
from llmcli.model.lora import apply_lora, lora_meta
from llmcli.recipe import Recipe, build_recipe

runner = CliRunner()
TEXT = "the cat sat on"


def make_checkpoint(path: Path, cfg, *, vocab_size: int = 257, tweak=None, **meta) -> Path:
    """A bytes-tokenizer checkpoint with random weights (init_std 0.3: peaked attention)."""
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg, vocab_size=vocab_size, init_std=0.3)
    recipe = Recipe(name="tiny")
    recipe.model = model_cfg
    recipe.data.tokenizer = "bytes"
    model = build_model(model_cfg)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    meta.setdefault("tokenizer", "bytes")
    save_model(path, model, recipe, step=0, **meta)
    return path


@pytest.fixture
def ckpt(tmp_path, tiny_model_cfg) -> Path:
    return make_checkpoint(tmp_path / "run" / "step-00000000.safetensors", tiny_model_cfg)


@pytest.fixture(params=["sinusoidal", "rope"])
def any_ckpt(request, tmp_path, tiny_model_cfg) -> Path:
    cfg = dataclasses.replace(tiny_model_cfg, positions=request.param,
                              norm="rmsnorm" if request.param == "rope" else "layernorm")
    return make_checkpoint(tmp_path / request.param / "step-00000000.safetensors", cfg)


def llm(*args: str):
    return runner.invoke(app, ["inspect", *args])


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ids_of(gen, text: str) -> torch.Tensor:
    return torch.tensor([prompt_ids(gen, text)])


# ---------------------------------------------------------------------------------------------
# attention


def test_attention_rows_sum_to_one_and_are_zero_above_the_diagonal(any_ckpt):
    gen = open_model(any_ckpt, "cpu")
    maps = attention_maps(gen, prompt_ids(gen, TEXT))
    T = len(TEXT)
    assert maps.weights.shape == (2, 4, T, T)
    assert torch.allclose(maps.weights.sum(-1), torch.ones(2, 4, T), atol=1e-5)
    assert torch.all(maps.weights.triu(diagonal=1) == 0)
    assert maps.weights.max() > 0.5  # not uniform: the fixture's heads really choose
    assert maps.tokens[1] == "'h'"
    top = maps.top(0, 0, k=2)
    assert [a.index for a in top[0]] == [0] and top[0][0].weight == pytest.approx(1.0)
    assert top[5][0].weight == pytest.approx(float(maps.weights[0, 0, 5].max()))
    # the model is back on the fused path
    assert not any(block.attn.reference for block in gen.model.blocks)


def test_reference_attention_matches_the_fused_path_and_the_seed_formula(any_ckpt):
    gen = open_model(any_ckpt, "cpu")
    model, idx = gen.model, ids_of(gen, TEXT)
    with torch.no_grad():
        fused, _ = model(idx)
        maps = attention_maps(gen, idx[0].tolist())
        model.attention_mode("reference")
        reference, _ = model(idx)
        model.attention_mode("sdpa")
        # block 1 head 1 by hand: softmax(Q·Kᵀ/√d with the future at −inf)
        x = model.tok_emb(idx)
        cfg = model.cfg
        if cfg.positions == "sinusoidal":
            x = x + sinusoidal_table(cfg.context_length, cfg.d_model)[:idx.shape[1]]
        q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].norm1(x)).chunk(3, dim=-1)
        hd = cfg.d_model // cfg.num_heads
        q, k = q[0, :, :hd], k[0, :, :hd]
        if cfg.positions == "rope":
            from llmcli.model.gpt import apply_rope

            T = idx.shape[1]
            q = apply_rope(q, model.rope_cos[:T], model.rope_sin[:T])
            k = apply_rope(k, model.rope_cos[:T], model.rope_sin[:T])
        scores = q @ k.T / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
        by_hand = torch.softmax(scores, dim=-1)
    assert torch.allclose(fused, reference, atol=1e-5)
    assert torch.allclose(maps.weights[0, 0], by_hand, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# score


def test_score_loss_is_the_models_own_loss_on_those_tokens(ckpt):
    gen = open_model(ckpt, "cpu")
    result = score_text(gen, TEXT, top=3)
    idx = torch.tensor([[256, *TEXT.encode()]])  # end-of-text starts the document
    with torch.no_grad():
        logits, loss = gen.model(idx[:, :-1], idx[:, 1:])
    assert len(result.tokens) == len(TEXT) and result.start == "'<|endoftext|>'"
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    probs = torch.softmax(logits[0], dim=-1)
    for pos, token in enumerate(result.tokens):
        target = int(idx[0, pos + 1])
        assert token.id == target and token.prob == pytest.approx(float(probs[pos, target]),
                                                                  rel=1e-4)
        assert token.rank == int((probs[pos] > probs[pos, target]).sum()) + 1
        assert token.top[0].id == int(probs[pos].argmax())
    assert result.accuracy == sum(t.rank == 1 for t in result.tokens) / len(TEXT)
    wrong = result.wrong(limit=100)
    assert all(t.rank > 1 for _, t in wrong)
    assert [t.prob for _, t in wrong] == sorted(t.prob for _, t in wrong)
    assert result.bits_per_byte == pytest.approx(float(loss) / math.log(2), rel=1e-5)


def test_score_colours_each_token_by_its_probability(ckpt):
    from rich.console import Console

    from llmcli.inspect.render import BANDS, band, score_text_view

    result = score_text(open_model(ckpt, "cpu"), TEXT)
    view = score_text_view(result)
    token_styles = [str(span.style) for span in view.spans][:len(result.tokens)]
    assert token_styles == [band(t.prob) for t in result.tokens]
    assert [band(p) for p in (0.9, 0.2, 0.05, 0.001)] == [style for _, style, _ in BANDS]
    console = Console(force_terminal=True, color_system="standard", width=200)
    with console.capture() as captured:
        console.print(view)
    assert "\x1b[" in captured.get()
    plain = score_text_view(result, color=False)
    assert plain.plain.startswith("t|h|e") and not any(str(s.style) in token_styles
                                                        for s in plain.spans)


def test_score_with_a_compact_vocabulary_without_end_of_text(tmp_path, tiny_model_cfg):
    # the vocabulary holds the text's letters (and no end-of-text): ids 0.. in byte order
    letters = sorted(set(TEXT.encode()))
    path = make_checkpoint(tmp_path / "c" / "step-00000000.safetensors", tiny_model_cfg,
                           vocab_size=len(letters) + 1, vocab_map=letters)
    gen = open_model(path, "cpu")
    result = score_text(gen, TEXT)
    ids = [letters.index(b) for b in TEXT.encode()]
    idx = torch.tensor([ids])
    with torch.no_grad():
        _, loss = gen.model(idx[:, :-1], idx[:, 1:])
    assert result.start is None and result.lead == b"t"
    assert len(result.tokens) == len(TEXT) - 1
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    assert result.tokens[0].token == "'h'"


# ---------------------------------------------------------------------------------------------
# lens and norms


def test_lens_last_row_is_the_models_real_prediction(any_ckpt):
    gen = open_model(any_ckpt, "cpu")
    idx = ids_of(gen, TEXT)
    with torch.no_grad():
        logits, _ = gen.model(idx)
    for position in (-1, 3):
        lens = logit_lens(gen, idx[0].tolist(), position, top=4)
        assert [r.layer for r in lens.rows] == ["embeddings", "block 1", "block 2"]
        assert torch.allclose(lens.logits[-1], logits[0, position], atol=1e-5)
        final = int(logits[0, position].argmax())
        last = lens.rows[-1]
        assert last.top[0].id == final and last.final_rank == 1
        assert last.final_prob == pytest.approx(float(torch.softmax(logits[0, position], -1)[
            final]), rel=1e-4)
        assert lens.token == f"'{TEXT[position]}'"
        # an earlier layer: the final norm and output layer applied to its residual stream
        kept: list[torch.Tensor] = []
        with torch.no_grad():
            gen.model.hidden(idx, keep=kept)
            first, _ = gen.model.head(gen.model.norm(kept[1][0, position]))
        assert torch.allclose(lens.logits[1], first, atol=1e-5)


def test_norm_statistics_rebuild_each_layers_output(any_ckpt):
    gen = open_model(any_ckpt, "cpu")
    report = norm_report(gen, prompt_ids(gen, TEXT), position=4)
    assert [s.name for s in report.steps] == ["block 1 norm1", "block 1 norm2", "block 2 norm1",
                                              "block 2 norm2", "final norm"]
    with torch.no_grad():
        x0 = gen.model.tok_emb(ids_of(gen, TEXT))[0, 4]
    rms = gen.model.cfg.norm == "rmsnorm"
    if not rms:  # the first norm's input is the token embedding plus its position
        x0 = x0 + sinusoidal_table(16, 32)[4]
    assert torch.allclose(report.steps[0].x, x0, atol=1e-6)
    for step in report.steps:
        assert step.kind == ("rmsnorm" if rms else "layernorm") and step.eps == 1e-5
        assert torch.allclose(step.by_hand(), step.y, atol=1e-5)
        assert step.mean == pytest.approx(float(step.x.mean()), abs=1e-6)
        if rms:
            assert step.beta is None
            assert float(step.normalized.pow(2).mean()) == pytest.approx(1, rel=1e-3)
        else:
            assert step.beta is not None
            assert float(step.normalized.mean()) == pytest.approx(0, abs=1e-5)
            assert float(step.normalized.var(unbiased=False)) == pytest.approx(1, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# embeddings: nearest neighbours and PCA on fixtures whose answer is known


def _axis_embeddings(model) -> None:
    """Every row along dimension 31, except a (97), b, c close to a and z (122) opposite."""
    w = model.tok_emb.weight
    w.zero_()
    w[:, 31] = 1.0
    e1, e2 = torch.eye(32)[0], torch.eye(32)[1]
    w[ord("a")] = e1
    w[ord("b")] = e1 + 0.1 * e2
    w[ord("c")] = e1 + 0.5 * e2
    w[ord("z")] = -e1


def test_nearest_neighbours_by_cosine(tmp_path, tiny_model_cfg):
    path = make_checkpoint(tmp_path / "e.safetensors", tiny_model_cfg, tweak=_axis_embeddings)
    gen = open_model(path, "cpu")
    near = emb.nearest(gen, single_id(gen, "a"), k=3)
    assert [n.token for n in near.nearest[:2]] == ["'b'", "'c'"]
    assert near.nearest[0].cosine == pytest.approx(1 / math.sqrt(1.01), rel=1e-5)
    assert near.nearest[1].cosine == pytest.approx(1 / math.sqrt(1.25), rel=1e-5)
    assert near.nearest[2].cosine == pytest.approx(0.0, abs=1e-6)
    everything = emb.nearest(gen, ord("a"), k=1000)
    assert everything.nearest[-1].token == "'z'" and everything.nearest[-1].cosine == -1.0
    assert ord("a") not in [n.id for n in everything.nearest]
    assert len(everything.nearest) == 256  # every other id (end-of-text has text too)


def test_pca_finds_the_directions_of_largest_variance(tmp_path, tiny_model_cfg):
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    u, v = basis[:, 0], basis[:, 1]
    a = torch.linspace(-3, 3, 20)
    b = torch.tensor([0.5, -0.5, -0.5, 0.5] * 5)  # uncorrelated with a
    ids = list(range(100, 120))

    def tweak(model):
        model.tok_emb.weight[ids] = 2.0 * basis[:, 5] + a[:, None] * u + b[:, None] * v

    path = make_checkpoint(tmp_path / "p.safetensors", tiny_model_cfg, tweak=tweak)
    gen = open_model(path, "cpu")
    pca = emb.pca(gen, ids, "fixture")
    var_a, var_b = float(a.var(unbiased=False)), float(b.var(unbiased=False))
    assert pca.explained == pytest.approx([var_a / (var_a + var_b), var_b / (var_a + var_b)],
                                          rel=1e-4)
    assert abs(float(pca.components[0] @ u)) == pytest.approx(1, abs=1e-5)
    assert abs(float(pca.components[1] @ v)) == pytest.approx(1, abs=1e-5)
    sign = torch.sign(pca.components[0] @ u)
    assert torch.allclose(pca.coords[:, 0], sign * a, atol=1e-4)
    assert torch.allclose(pca.coords[:, 1].abs(), b.abs(), atol=1e-4)
    assert pca.tokens[0] == "'d'"  # byte 100


def test_frequent_tokens_come_from_the_corpus_token_file(tmp_path, tiny_model_cfg):
    from llmcli.data.tokenize import ensure_tokens

    text = tmp_path / "corpus.txt"
    text.write_text("eeeeeeee aaaaaa ttttt oooo\n" * 3)
    data = tmp_path / "data"
    ensure_tokens(text, "bytes", 0.1, cache_dir=data)
    path = make_checkpoint(tmp_path / "f.safetensors", tiny_model_cfg)
    gen = open_model(path, "cpu")
    gen.recipe.data.source = str(text)
    ids, source = emb.frequent_ids(gen, 4, data_dir=data)
    assert ids == [ord(c) for c in "eato"] and "corpus.bytes.tokens" in source
    # a sharded corpus (a folder of shards with an index) counts across its shards
    from llmcli.data.tokenize import tokenize_files

    tokenize_files([text], data / "sharded", "bytes", 0.1, shard_tokens=1024)
    gen.recipe.data.source = str(data / "sharded.tokens")
    ids, source = emb.frequent_ids(gen, 4, data_dir=data)
    assert ids == [ord(c) for c in "eato"] and "sharded.tokens" in source
    # without a token file: the built-in English paragraph, most common first (' ', 'e', ...)
    gen.recipe.data.source = str(tmp_path / "missing.txt")
    ids, source = emb.frequent_ids(gen, 3, data_dir=data)
    assert ids[:2] == [ord(" "), ord("e")] and "built-in" in source
    # more than the corpus holds: the count said is the count taken from it
    gen.recipe.data.source = str(text)
    ids, source = emb.frequent_ids(gen, 8, data_dir=data)
    assert len(ids) == 8 and ids[:4] == [ord(c) for c in "eato"]
    assert source.startswith("the 6 most frequent tokens of ") and "built-in" in source


# ---------------------------------------------------------------------------------------------
# positions


def test_position_tables_are_the_models_own(tmp_path, tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, vocab_size=257)
    model = build_model(cfg)
    sin = position_table(cfg)
    assert torch.equal(sin.values, model.pos_table)
    assert sin.values[3, 4] == pytest.approx(math.sin(3 / 10000 ** (4 / 32)), abs=1e-6)
    assert sin.values[3, 5] == pytest.approx(math.cos(3 / 10000 ** (4 / 32)), abs=1e-6)
    assert sin.wavelengths[0] == pytest.approx(2 * math.pi)
    rope_cfg = dataclasses.replace(cfg, positions="rope")
    rope = position_table(rope_cfg)
    assert torch.equal(rope.values, build_model(rope_cfg).rope_cos)
    assert rope.frequencies[1] == pytest.approx(10000 ** (-2 / 8))
    # learned: the trained rows, read from a checkpoint; a recipe alone has none
    learned = make_checkpoint(tmp_path / "l.safetensors",
                              dataclasses.replace(tiny_model_cfg, positions="learned"))
    table = load_positions(str(learned))
    gen = open_model(learned, "cpu")
    assert table.kind == "learned" and torch.equal(table.values, gen.model.pos_emb.weight)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  positions: learned\n  context_length: 16\n")
    with pytest.raises(UserError, match="learned positions have no values"):
        load_positions(str(recipe))


def test_an_odd_width_s_last_sinusoidal_pair_has_one_dimension(tiny_model_cfg):
    from rich.console import Console

    from llmcli.inspect.render import position_tables

    cfg = dataclasses.replace(tiny_model_cfg, d_model=15, num_heads=5, vocab_size=257)
    table = position_table(cfg)
    assert table.values.shape[-1] == 15 and len(table.frequencies) == 8
    console = Console(width=150, record=True)
    for part in position_tables(table, 2, 150):
        console.print(part)
    text = console.export_text()
    assert " 12, 13 " in text and " 14 " in text and "14, 15" not in text


# ---------------------------------------------------------------------------------------------
# the command


def test_every_view_prints_json_and_writes_readable_pngs(tmp_path, ckpt):
    out = tmp_path / "pics"
    data = as_json(llm("embeddings", str(ckpt), "--tokens", "ab", "--near", "a",
                       "--png", str(out / "pca.png"), "--count", "8", "--json"))
    assert [r["token"] for r in data["rows"]] == ["a", "b"] and data["shape"] == [257, 32]
    gen = open_model(ckpt, "cpu")
    assert data["rows"][0]["values"] == pytest.approx(gen.model.tok_emb.weight[97].tolist())
    assert len(data["near"]["nearest"]) == 10 and len(data["pca"]["points"]) == 8
    data = as_json(llm("positions", str(ckpt), "--png", str(out / "pos.png"), "--json"))
    assert data["kind"] == "sinusoidal" and data["shape"] == [16, 32]
    data = as_json(llm("attention", str(ckpt), "hello", "--png", str(out / "att.png"),
                       "--json"))
    assert len(data["maps"]) == 8 and data["tokens"][0] == "h"
    assert sum(data["maps"][3]["weights"][4]) == pytest.approx(1, abs=1e-5)
    one = as_json(llm("attention", str(ckpt), "hello", "--block", "2", "--head", "3",
                      "--png", str(out / "one.png"), "--json"))
    assert [(m["block"], m["head"]) for m in one["maps"]] == [(2, 3)]
    assert one["maps"][0]["weights"] == data["maps"][6]["weights"]
    data = as_json(llm("score", str(ckpt), TEXT, "--json"))
    assert data["loss"] == pytest.approx(score_text(gen, TEXT).loss, rel=1e-6)
    data = as_json(llm("lens", str(ckpt), TEXT, "--position", "2", "--json"))
    assert data["position"] == 2 and len(data["layers"]) == 3
    data = as_json(llm("norms", str(ckpt), TEXT, "--json"))
    assert data["position"] == len(TEXT) - 1 and len(data["norms"]) == 5
    for name in ("pca.png", "pos.png", "att.png", "one.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in out.iterdir()) == ["att.png", "one.png", "pca.png", "pos.png"]
    again = llm("positions", str(ckpt), "--png", str(out / "pos.png"))  # a PNG is redrawn
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("view", [["positions"], ["attention", "_", "hi"], ["embeddings"]])
def test_png_never_replaces_a_file_that_is_not_a_picture(ckpt, tmp_path, view):
    args = [view[0], str(ckpt), *view[2:]]
    before = ckpt.read_bytes()
    result = llm(*args, "--png", str(ckpt))  # the checkpoint itself, by mistake
    assert result.exit_code == 2 and "ending in .png" in result.stderr
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    result = llm(*args, "--png", str(notes))
    assert result.exit_code == 2 and "is not a PNG image" in result.stderr
    assert ckpt.read_bytes() == before and notes.read_text() == "my notes"


def test_terminal_views_show_tokens_and_numbers(ckpt, tmp_path):
    result = llm("score", str(ckpt), "--file", str(_write(tmp_path / "t.txt", TEXT)))
    assert result.exit_code == 0, result.output
    assert "t|h|e| |c" in result.stdout and "perplexity" in result.stdout
    result = llm("attention", str(ckpt), "abc", "--block", "1", "--head", "1", "--top", "2")
    assert result.exit_code == 0 and "block 1 · head 1" in result.stdout
    assert "'c' ←" in result.stdout
    result = llm("lens", str(ckpt), "abc")
    assert result.exit_code == 0 and "block 2" in result.stdout
    result = llm("norms", str(ckpt), "abc", "--block", "0")
    assert result.exit_code == 0 and "final norm (before the output layer)" in result.stdout
    result = llm("embeddings", str(ckpt))
    assert result.exit_code == 0 and "257 × 32" in result.stdout and "<|endoftext|>" in \
        result.stdout
    result = llm("positions", str(ckpt))
    assert result.exit_code == 0 and "wavelength" in result.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_lora_run_is_inspected_merged(tmp_path, tiny_model_cfg):
    base = make_checkpoint(tmp_path / "base" / "step-00000000.safetensors", tiny_model_cfg)
    model_cfg = dataclasses.replace(tiny_model_cfg, vocab_size=257, init_std=0.3)
    recipe = build_recipe({"data": {"tokenizer": "bytes"}, "model": dataclasses.asdict(model_cfg),
                           "lora": {"rank": 2, "targets": ["qkv", "head"]}})
    model = open_model(base, "cpu").model
    apply_lora(model, recipe.lora)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    run = tmp_path / "lora"
    adapter = run / "step-00000001.safetensors"
    save_adapter(adapter, model, recipe, tokenizer="bytes", lora=lora_meta(recipe.lora),
                 **base_reference(run, base))
    merged = as_json(llm("score", str(run), TEXT, "--json"))
    plain = as_json(llm("score", str(base), TEXT, "--json"))
    with torch.no_grad():
        idx = torch.tensor([[256, *TEXT.encode()]])
        _, loss = model.eval()(idx[:, :-1], idx[:, 1:])
    assert merged["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert merged["loss"] != pytest.approx(plain["loss"], rel=1e-3)


@pytest.mark.parametrize(("args", "words"), [
    (["frobnicate", "x"], "no view 'frobnicate'"),
    (["lense", "x", "y"], "did you mean lens?"),
    (["embeddings", "{ckpt}", "--near", "ab"], "not one token but 2 ('a', 'b')"),
    (["embeddings", "{compact}", "--near", "q"], "token 'q' (bytes id 113) is not in this"),
    (["embeddings", "{compact}", "--tokens", "the quiz"], "token 'q'"),
    (["attention", "{ckpt}", "x" * 17], "prompt is 17 tokens, longer than this model's context"),
    (["score", "{ckpt}", "x" * 17], "the text is 17 tokens and this model's context is 16"),
    (["attention", "{ckpt}", "abc", "--block", "3"], "--block 3: this model has 2 blocks"),
    (["lens", "{ckpt}", "abc", "--position", "3"], "--position 3: the prompt has 3 token"),
    (["score", "{ckpt}"], "give the text to score"),
    (["score", "{ckpt}", "--file", "{missing}"], "file not found"),
    (["score", "{ckpt}", "--file", "/dev/zero"], "--file /dev/zero: more than 64 MiB of text"),
    (["score", "{ckpt}", "--file", "{ckpt}"], "not UTF-8 text"),
    (["positions", "{missing}"], "checkpoint not found"),
    # options a combination does not use: once dropped in silence
    (["embeddings", "{ckpt}", "--count", "5"], "--count: not used without --png"),
    (["embeddings", "{ckpt}", "-k", "3", "--png", "{png}"], "--top: not used without --near"),
    (["positions", "{ckpt}", "--json", "--rows", "3"], "--rows: not used with --json"),
    (["score", "{ckpt}", "abc", "--json", "--limit", "2"], "--limit: not used with --json"),
    (["norms", "{ckpt}", "abc", "--json", "--block", "2", "--dims", "3"],
     "--block, --dims: not used with --json"),
])
def test_bad_input_is_one_line(tmp_path, ckpt, tiny_model_cfg, args, words):
    compact = make_checkpoint(tmp_path / "c" / "step-00000000.safetensors", tiny_model_cfg,
                              vocab_size=len(set(TEXT.encode())) + 1,
                              vocab_map=sorted(set(TEXT.encode())))
    paths = {"ckpt": str(ckpt), "compact": str(compact), "missing": str(tmp_path / "no.txt"),
             "png": str(tmp_path / "e.png")}
    line = error_line(llm(*(a.format(**paths) for a in args)))
    assert words in line, line


JSON_PROMPT = "the qé"  # 'q' is outside the compact vocabulary; é is two bytes, neither UTF-8


@pytest.mark.parametrize("compact", [False, True])
def test_json_tokens_are_raw_text_and_tokenizer_ids(tmp_path, tiny_model_cfg, compact):
    """Every view's --json names tokens as `llm generate --json` does: "token" the raw text
    (a stray byte is U+FFFD), "id" the tokenizer's id; ids without text have "token": null and
    the compact vocabulary's unknown id also "id": null."""
    kept = sorted({*TEXT.encode(), 0xC3, 0xA9, 256})
    meta = {"vocab_size": len(kept) + 1, "vocab_map": kept} if compact else {"vocab_size": 259}
    path = make_checkpoint(tmp_path / "j" / "step-00000000.safetensors", tiny_model_cfg, **meta)
    gen = open_model(path, "cpu")

    def want(model_id: int) -> dict:
        tokenizer_id = model_id if not compact else (
            kept[model_id] if model_id < len(kept) else None)
        if tokenizer_id is None or tokenizer_id > 256:
            return {"id": tokenizer_id, "token": None}
        text = "<|endoftext|>" if tokenizer_id == 256 else bytes([tokenizer_id]).decode(
            "utf-8", errors="replace")
        return {"id": tokenizer_id, "token": text}

    def got(entries: list[dict]) -> list[dict]:
        return [{"id": e["id"], "token": e["token"]} for e in entries]

    unknown = len(kept) if compact else ord("q")  # the model id 'q' reads as
    data = as_json(llm("embeddings", str(path), "--json"))  # the first and last ids
    last = ({"id": None, "token": None} if compact else {"id": 258, "token": None})
    assert got(data["rows"])[-1] == last and got(data["rows"]) == [
        want(i) for i in emb.default_ids(gen.vocab.vocab_size)]
    data = as_json(llm("embeddings", str(path), "--tokens", "hé", "--near", "t", "--png",
                       str(tmp_path / "pca.png"), "--count", "5", "--json"))
    assert got(data["rows"]) == [{"id": 104, "token": "h"}, {"id": 0xC3, "token": "\ufffd"},
                                 {"id": 0xA9, "token": "\ufffd"}]
    near = emb.nearest(gen, single_id(gen, "t"))
    assert {"id": data["near"]["id"], "token": data["near"]["token"]} == {"id": 116, "token": "t"}
    assert got(data["near"]["nearest"]) == [want(n.id) for n in near.nearest]
    assert got(data["pca"]["points"]) == [want(i) for i in emb.frequent_ids(gen, 5)[0]]

    ids = prompt_ids(gen, JSON_PROMPT)
    assert ids[4] == unknown
    data = as_json(llm("attention", str(path), JSON_PROMPT, "--top", "2", "--json"))
    prompt = [want(i) for i in ids]
    assert data["ids"] == [t["id"] for t in prompt]
    assert data["tokens"] == [t["token"] for t in prompt]
    assert data["tokens"][5:] == ["\ufffd", "\ufffd"] and data["ids"][5:] == [0xC3, 0xA9]
    for row in data["maps"][0]["top"]:
        assert got(row) == [prompt[a["index"]] for a in row]

    data = as_json(llm("score", str(path), JSON_PROMPT, "--json"))
    scored = score_text(gen, JSON_PROMPT)
    assert data["start"] == "<|endoftext|>"
    assert got(data["tokens"]) == prompt
    for entry, token in zip(data["tokens"], scored.tokens, strict=True):
        assert got(entry["top"]) == [want(c.id) for c in token.top]

    data = as_json(llm("lens", str(path), JSON_PROMPT, "--position", "4", "--json"))
    lens = logit_lens(gen, ids, 4, top=3)
    assert {"id": data["id"], "token": data["token"]} == prompt[4]
    for layer, row in zip(data["layers"], lens.rows, strict=True):
        assert got(layer["top"]) == [want(c.id) for c in row.top]
    data = as_json(llm("norms", str(path), JSON_PROMPT, "--position", "-1", "--json"))
    assert {"id": data["id"], "token": data["token"]} == {"id": 0xA9, "token": "\ufffd"}

    # the same text and id as `llm generate --json` gives for the greedy choice (which skips
    # textless ids)
    lens = logit_lens(gen, ids, -1, top=4)
    first = next(c.id for c in lens.rows[-1].top if c.id not in gen.banned)
    made = runner.invoke(app, ["generate", str(path), JSON_PROMPT, "--strategy", "greedy",
                               "--max-new-tokens", "1", "--show-probs", "--json"])
    assert made.exit_code == 0, made.output
    made = json.loads(made.stdout)
    assert want(first) == {"id": made["results"][0]["token_ids"][0],
                                             "token": made["steps"][0]["chosen"]}


def test_score_needs_text(ckpt):
    result = llm("score", str(ckpt))
    assert result.exit_code == 2 and "no text given" in result.stderr


def test_a_one_head_attention_grid_keeps_room_for_its_title_and_colour_bar(tmp_path):
    """Two blocks of one head made a 3.4-inch figure whose title and colour-bar labels were
    cut off on both sides."""
    import struct
    from types import SimpleNamespace

    from llmcli.inspect.plots import DPI, attention_png

    weights = torch.tril(torch.ones(2, 1, 3, 3)) / torch.arange(1, 4).view(1, 1, 3, 1)
    maps = SimpleNamespace(tokens=["a", "b", "c"], weights=weights)
    target = attention_png(maps, tmp_path / "a.png", [0, 1], [0],
                           "attention weights of run (rows: blocks · columns: heads)")
    width = struct.unpack(">I", target.read_bytes()[16:20])[0]
    assert width >= 6.5 * DPI - 1
