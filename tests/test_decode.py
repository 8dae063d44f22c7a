"""Decoding on tiny random models: cache equivalence, exact beam search, filters, penalties,
seeds, stop strings and streaming text."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from llmcli.generate.decode import (
    Context,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    beam_search,
    check_settings,
    filter_masks,
    prepare_model,
    sample,
    sampling_keep,
)
from llmcli.generate.stream import StopBytes, TextStream, render
from llmcli.model.gpt import build_model
from llmcli.recipe import GenerateConfig, ModelConfig


def tiny_model(cfg: ModelConfig, seed: int = 0, **change) -> torch.nn.Module:
    """A random model with peaked distributions (large init), so argmaxes have no near-ties."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, **{"init_std": 0.4, **change})
    return prepare_model(build_model(cfg))


def settings(**kw) -> GenerateConfig:
    return dataclasses.replace(GenerateConfig(), **kw)


GREEDY = settings(strategy="greedy", max_new_tokens=12)


def test_prepared_model_keeps_names_outputs_and_training(tiny_model_cfg):
    from llmcli.model.fast_decode import OneDNNLinear, onednn_works

    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg).eval()
    fast = prepare_model(build_model(tiny_model_cfg))
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    if onednn_works():
        assert isinstance(fast.lm_head, OneDNNLinear)
    x = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        assert torch.allclose(fast(x)[0], plain(x)[0], atol=1e-5)
    _, loss = fast(x, targets=x)  # with gradients it is plain nn.Linear again
    loss.backward()
    assert fast.lm_head.weight.grad is not None


def test_bf16_decoding_layout_follows_weight_changes(tiny_model_cfg):
    """bf16 layers decode through oneDNN's blocked copy of the weight: same outputs as plain
    bf16 nn.Linear, and a weight loaded afterwards is used, not the stale copy."""
    from llmcli.model.fast_decode import OneDNNLinear, onednn_works

    if not onednn_works(torch.bfloat16):
        pytest.skip("this torch build has no oneDNN bf16 linear kernel")
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg).eval().to(torch.bfloat16)
    fast = prepare_model(build_model(tiny_model_cfg), torch.bfloat16)
    assert isinstance(fast.lm_head, OneDNNLinear)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        fast(x)  # makes the blocked copies of the first weights
        fast.load_state_dict(plain.state_dict())
        got, want = fast(x)[0].float(), plain(x)[0].float()
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# KV cache and sliding window


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
def test_cached_and_uncached_greedy_give_identical_tokens(tiny_model_cfg, positions):
    model = tiny_model(tiny_model_cfg, positions=positions)
    prompt = [5, 17, 3, 40]
    # 40 new tokens with context 16: the window slides several times.
    g = settings(strategy="greedy", max_new_tokens=40)
    cached = sample(model, prompt, g, use_cache=True)[0]
    uncached = sample(model, prompt, g, use_cache=False)[0]
    assert cached.tokens == uncached.tokens
    assert len(cached.tokens) == 40
    assert cached.logprob == pytest.approx(uncached.logprob, rel=1e-4)


def test_cached_greedy_equals_recomputing_the_whole_context_each_step(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    prompt = [1, 2, 3]
    g = settings(strategy="greedy", max_new_tokens=13)  # 3 + 13 = 16 = context_length
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(13):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert sample(model, prompt, g)[0].tokens == seq[3:]


def test_window_slides_to_the_last_three_quarters_of_the_context(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    ctx = Context(model, list(range(20)))  # longer than the context of 16
    ctx.prefill()
    assert ctx.start == 20 - 12 and ctx.slides == 1
    for token in range(4):  # 12 + 4 = 16 fits
        ctx.advance(torch.tensor([token]))
    assert ctx.slides == 1 and ctx.cache.length == 16
    ctx.advance(torch.tensor([7]))  # 17 > 16: slide again, rerun the last 12
    assert ctx.slides == 2 and ctx.cache.length == 12
    assert ctx.seq[0, ctx.start:].tolist()[-1] == 7


def test_prompt_runs_in_one_forward_pass_then_one_token_per_step(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    model.native_decode = False  # PyTorch's steps, which the hook sees (native: its own tests)
    lengths = []
    hook = model.tok_emb.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    sample(model, [1, 2, 3, 4, 5], settings(strategy="greedy", max_new_tokens=5))
    hook.remove()
    assert lengths == [5, 1, 1, 1, 1]  # the 5th token needs no forward pass


# ---------------------------------------------------------------------------------------------
# Beam search


def exhaustive(model, prompt, vocab, max_new, eos, length_penalty):
    """Every sequence of up to max_new tokens (ending early only at eos), scored like beams."""
    scored = []
    with torch.no_grad():
        for length in range(1, max_new + 1):
            for seq in itertools.product(range(vocab), repeat=length):
                if eos in seq[:-1] or (length < max_new and seq[-1] != eos):
                    continue
                full = list(prompt) + list(seq)
                logits, _ = model(torch.tensor([full]))
                logp = torch.log_softmax(logits[0].float(), -1)
                total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
                scored.append((total / length ** length_penalty, list(seq)))
    return sorted(scored, reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
def test_beam_search_with_enough_beams_is_exhaustive_search(tiny_model_cfg, length_penalty):
    vocab, max_new, eos = 4, 3, 0
    model = tiny_model(tiny_model_cfg, vocab_size=vocab)
    prompt = [1, 2]
    g = settings(strategy="beam", num_beams=vocab ** max_new, max_new_tokens=max_new,
                 length_penalty=length_penalty)
    beams = beam_search(model, prompt, g, num_return=10, eos_id=eos)
    expected = exhaustive(model, prompt, vocab, max_new, eos, length_penalty)[:10]
    assert [b.tokens for b in beams] == [seq for _, seq in expected]
    assert [b.score for b in beams] == pytest.approx([s for s, _ in expected], rel=1e-4)
    assert {b.finish for b in beams} <= {"eos", "length"}


def test_beam_search_with_one_beam_is_greedy(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    beam = beam_search(model, [3, 9], settings(strategy="beam", num_beams=1,
                                               max_new_tokens=12))[0]
    assert beam.tokens == sample(model, [3, 9], GREEDY)[0].tokens


def test_beam_search_reorders_the_cache_like_recomputing(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    g = settings(strategy="beam", num_beams=5, max_new_tokens=30)  # slides past context 16
    with_cache = beam_search(model, [4, 5, 6], g, num_return=5, use_cache=True)
    without = beam_search(model, [4, 5, 6], g, num_return=5, use_cache=False)
    assert [b.tokens for b in with_cache] == [b.tokens for b in without]


def to_hf_gpt2(model):
    """Our GPT-2-shaped model (learned positions, GELU, tied, biases) as transformers' GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model,
        n_layer=c.num_blocks, n_head=c.num_heads, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        layer_norm_epsilon=c.norm_eps, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)).eval()
    sd = {"transformer.wte.weight": model.tok_emb.weight,
          "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
            p + "attn.c_attn.weight": b.attn.qkv.weight.t(),
            p + "attn.c_attn.bias": b.attn.qkv.bias,
            p + "attn.c_proj.weight": b.attn.proj.weight.t(),
            p + "attn.c_proj.bias": b.attn.proj.bias,
            p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
            p + "mlp.c_fc.weight": b.ffn.fc_in.weight.t(), p + "mlp.c_fc.bias": b.ffn.fc_in.bias,
            p + "mlp.c_proj.weight": b.ffn.fc_out.weight.t(),
            p + "mlp.c_proj.bias": b.ffn.fc_out.bias,
        })
    hf.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=False)
    return hf


def test_greedy_and_beam_search_match_transformers_on_the_same_weights(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg, positions="learned", activation="gelu", qkv_bias=True,
                       tie_embeddings=True, context_length=32)
    hf = to_hf_gpt2(model)
    prompt = [7, 3, 11]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4)
        hf_greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        hf_beams = hf.generate(ids, max_new_tokens=8, num_beams=3, num_return_sequences=3,
                               do_sample=False, pad_token_id=0, length_penalty=1.0)
    assert sample(model, prompt, settings(strategy="greedy", max_new_tokens=10))[0].tokens \
        == hf_greedy[0, 3:].tolist()
    ours = beam_search(model, prompt, settings(strategy="beam", num_beams=3, max_new_tokens=8),
                       num_return=3)
    assert [b.tokens for b in ours] == hf_beams[:, 3:].tolist()


# ---------------------------------------------------------------------------------------------
# Sampling


def test_temperature_near_zero_equals_greedy(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    greedy = sample(model, [2, 8], GREEDY)[0].tokens
    gen = torch.Generator().manual_seed(0)
    cold = sample(model, [2, 8], settings(strategy="sample", temperature=0.01,
                                          max_new_tokens=12), generator=gen)[0].tokens
    zero = sample(model, [2, 8], settings(strategy="sample", temperature=0.0,
                                          max_new_tokens=12))[0].tokens
    assert cold == greedy == zero


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg, init_std=0.05)  # flat: sampling varies
    g = settings(strategy="sample", temperature=1.0, max_new_tokens=20)

    def run(seed):
        return sample(model, [1], g, num_sequences=2,
                      generator=torch.Generator().manual_seed(seed))

    first, again, other = run(7), run(7), run(8)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert [r.tokens for r in first] != [r.tokens for r in other]
    assert first[0].tokens != first[1].tokens  # two sequences, two draws


PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])


@pytest.mark.parametrize(("knobs", "kept"), [
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 1}, [0]),
    ({"top_p": 0.75}, [0, 1, 2]),  # 0.5 + 0.2 < 0.75, so the third token is needed
    ({"top_p": 0.45}, [0]),
    ({"top_p": 1.0}, [0, 1, 2, 3, 4]),
    ({"min_p": 0.25}, [0, 1, 2]),  # keeps p >= 0.125
    ({"min_p": 0.5}, [0]),  # keeps p >= 0.25
    ({"top_k": 4, "top_p": 0.8}, [0, 1, 2]),  # over the renormalised top 4: .526 .211 .158
    ({"top_k": 3, "min_p": 0.35}, [0, 1]),
])
def test_filters_keep_exactly_the_right_candidates(knobs, kept):
    keep = sampling_keep(PROBS.log(), settings(**knobs))
    if keep is None:  # no filter active
        keep = torch.ones_like(PROBS, dtype=torch.bool)
    expected = torch.zeros(5, dtype=torch.bool)
    expected[kept] = True
    assert keep[0].tolist() == expected.tolist()


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert sampling_keep(logits, settings(top_k=2))[0].tolist() == [True, True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_filters_agree_with_transformers_warpers(seed):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(seed)
    # Sharp and flat rows: the flat ones need more than the first 256 sorted candidates.
    logits = torch.cat([torch.randn(3, 5000) * 4, torch.randn(2, 5000) * 0.05])
    g = settings(temperature=0.7, top_k=[0, 3000, 40, 4000][seed], top_p=[0.9, 0.5, 0.99, 1][seed],
                 min_p=[None, 0.05, 0.0, 0.2][seed])
    warpers = LogitsProcessorList([TemperatureLogitsWarper(g.temperature)])
    if g.top_k:
        warpers.append(TopKLogitsWarper(g.top_k))
    if g.top_p < 1:
        warpers.append(TopPLogitsWarper(g.top_p))
    if g.min_p:
        warpers.append(MinPLogitsWarper(g.min_p))
    hf = warpers(torch.zeros(5, 1, dtype=torch.long), logits.clone())
    keep = sampling_keep(logits / g.temperature, g)
    assert keep is not None
    assert keep.tolist() == torch.isfinite(hf).tolist()


def test_filter_masks_name_each_filter_in_order():
    masks = filter_masks(PROBS.log(), settings(top_k=4, top_p=0.8, min_p=0.3))
    assert [name for name, _ in masks] == ["top-k", "top-p", "min-p"]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seq = torch.randint(0, 50, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seq, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seq, penalty), expected)


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]  # positive halved, negative doubled, unseen kept


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(size):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    torch.manual_seed(size)
    seq = torch.randint(0, 6, (4, 15))  # a small alphabet: many repeats
    logits = torch.randn(4, 6)
    expected = NoRepeatNGramLogitsProcessor(size)(seq, logits.clone())
    assert torch.equal(ban_repeated_ngrams(logits, seq, size), expected)


def test_greedy_with_no_repeat_ngram_never_repeats_a_trigram(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg, vocab_size=8)  # tiny vocabulary: loops come fast
    g = settings(strategy="greedy", max_new_tokens=30, no_repeat_ngram_size=3)
    prompt = [1, 2, 3]
    seq = prompt + sample(model, prompt, g)[0].tokens
    grams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    assert len(grams) == len(set(grams))
    plain = prompt + sample(model, prompt, dataclasses.replace(g, no_repeat_ngram_size=0))[0].tokens
    assert len({tuple(plain[i:i + 3]) for i in range(len(plain) - 2)}) < len(plain) - 2


def test_banned_ids_are_never_generated(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    free = sample(model, [1], GREEDY)[0].tokens
    banned = sorted(set(free))
    tokens = sample(model, [1], GREEDY, banned=banned)[0].tokens
    assert not set(tokens) & set(banned)


def test_end_of_text_ends_the_sequence(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    free = sample(model, [1], GREEDY)[0].tokens
    eos = free[4]
    result = sample(model, [1], GREEDY, eos_id=eos)[0]
    assert result.finish == "eos" and result.tokens == free[:free.index(eos) + 1]


def test_scores_are_log_probabilities_length_normalised(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    result = sample(model, [1, 2], settings(strategy="greedy", max_new_tokens=5,
                                            length_penalty=1.0))[0]
    seq = [1, 2] + result.tokens
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)
    expected = sum(float(logp[i + 1, t]) for i, t in enumerate(result.tokens))
    assert result.logprob == pytest.approx(expected, rel=1e-4)
    assert result.score == pytest.approx(expected / 5, rel=1e-4)


@pytest.mark.parametrize(("knob", "value", "flag"), [
    ("temperature", -0.1, "--temperature"),
    ("top_p", 0.0, "--top-p"),
    ("top_p", 1.5, "--top-p"),
    ("num_beams", 0, "--num-beams"),
    ("min_p", 2.0, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("max_new_tokens", 0, "--max-new-tokens"),
    ("top_k", -1, "--top-k"),
])
def test_out_of_range_knobs_are_refused_naming_the_option(knob, value, flag):
    with pytest.raises(ValueError, match=flag):
        check_settings(settings(**{knob: value}))


# ---------------------------------------------------------------------------------------------
# Stop strings and streaming text


def test_stop_string_ends_generation(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg)
    free = sample(model, [1], GREEDY)[0].tokens  # ids < 64: ASCII bytes
    pair = free[3:5]
    first = next(i for i in range(len(free)) if free[i:i + 2] == pair)
    stop = StopBytes([bytes(pair).decode("ascii")], lambda t: bytes([t]))
    result = sample(model, [1], GREEDY, stop=stop)[0]
    assert result.finish == "stop" and result.tokens == free[:first + 2]


def test_stream_holds_back_incomplete_utf8():
    data = "中文 ok".encode()
    stream = TextStream()
    pieces = [stream.push(data[i:i + 1]) for i in range(len(data))]
    assert pieces[:3] == ["", "", "中"]  # three bytes, one character
    assert "".join(pieces) + stream.finish() == "中文 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_stream_never_prints_half_of_a_chinese_character_split_by_cl100k():
    from llmcli.data.tokenizer import get_tokenizer

    tok = get_tokenizer("cl100k_base")
    text = "刘峰出生于龘，一个寒冷的冬天。"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert any(p.decode("utf-8", errors="replace") != p.decode("utf-8", errors="ignore")
               for p in pieces)  # some token really is a fragment of a character
    stream = TextStream()
    shown = [stream.push(p) for p in pieces] + [stream.finish()]
    assert "".join(shown) == text and not any("\ufffd" in s for s in shown)


def test_stream_holds_back_what_may_be_a_stop_string():
    stream = TextStream(stop=["###"])
    assert stream.push(b"answer #") == "answer "
    assert stream.push(b"#") == ""
    assert stream.push(b"# more") == ""
    assert stream.stopped and stream.text == "answer "
    other = TextStream(stop=["###"])
    assert other.push(b"a #") == "a "
    assert other.push(b" b") == "# b"  # not a stop string after all
    assert other.finish() == ""


def test_stream_releases_a_dangling_prefix_at_the_end():
    stream = TextStream(stop=["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.finish() == "ST"


def test_render_cuts_at_the_first_stop_string():
    assert render([b"a", b"bc", b"<|end", b"|> x"], ["<|end|>", "c<"]) == ("ab", True)
    assert render([b"\xe4\xb8"], []) == ("\ufffd", False)  # never completed


def test_stop_bytes_looks_only_at_the_newest_tokens():
    pieces = {1: b"ab", 2: b"c", 3: b"\n", 4: b"#"}
    stop = StopBytes(["c\n#"], pieces.__getitem__)
    assert not stop([1, 2])
    assert not stop([1, 2, 3])
    assert stop([1, 2, 3, 4])


def test_show_probs_steps_mark_the_chosen_token_and_filters(tiny_model_cfg):
    model = tiny_model(tiny_model_cfg, init_std=0.1)
    steps = []
    g = settings(strategy="sample", temperature=1.0, top_k=3, max_new_tokens=4)
    result = sample(model, [1], g, generator=torch.Generator().manual_seed(0),
                    on_step=steps.append)[0]
    assert [s.chosen for s in steps] == result.tokens
    for s in steps:
        assert s.ranks == sorted(s.ranks)
        assert s.removed_by[:3] == [None, None, None] and s.removed_by[3] == "top-k"
        kept = [p for p, why in zip(s.draw_probs, s.removed_by, strict=True) if not why]
        assert math.isclose(sum(kept), 1, rel_tol=1e-4)
