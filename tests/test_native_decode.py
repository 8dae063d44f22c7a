"""The native decoding step: the PyTorch model's logits and cache for every architecture option,
the same greedy tokens through `sample`, and PyTorch wherever it cannot or should not run."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch

from llmcli.generate.decode import Context, prepare_model, sample
from llmcli.model import native_decode
from llmcli.model.gpt import build_model
from llmcli.model.lora import apply_lora
from llmcli.recipe import GenerateConfig, LoraConfig, ModelConfig

# d_model 96 leaves a tail after the kernels' 64- and 128-wide steps; heads of 24 are even.
CFG = ModelConfig(vocab_size=300, context_length=24, d_model=96, num_blocks=2, num_heads=4,
                  dropout=0.0)
BF16_TOLERANCE = 0.05  # of the largest logit: bf16 weights, activations rounded differently


@pytest.fixture(scope="module", autouse=True)
def needs_library():
    if native_decode.library() is None:
        pytest.skip("no C++ compiler with OpenMP here: decoding stays in PyTorch")


@contextlib.contextmanager
def num_threads(threads: int):
    """torch's (and so the native step's) thread count, for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_model(dtype: torch.dtype = torch.float32, seed: int = 0, **change) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(CFG, **change)).eval()
    with torch.no_grad():
        for p in model.parameters():  # large weights: peaked logits, every path matters
            p.normal_(0.0, 0.3)
    return prepare_model(model, dtype)


def compare_steps(model: torch.nn.Module, steps: int = 12) -> tuple[float, float]:
    """Largest relative logit difference and largest cache difference over `steps` tokens."""
    decoder = native_decode.native_decoder(model)
    assert decoder is not None
    reference, native = model.new_cache(1), model.new_cache(1)
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    logit_error = 0.0
    with torch.inference_mode():
        model(prompt, cache=reference)
        model(prompt, cache=native)
        for _ in range(steps):
            token = torch.randint(0, CFG.vocab_size, (1, 1))
            want = model(token, cache=reference, last_only=True)[0][:, -1].float()
            got = decoder.step(int(token), native)
            assert got.shape == want.shape and got.dtype == torch.float32
            logit_error = max(logit_error, float((got - want).abs().max() / want.abs().max()))
    assert native.length == reference.length == 5 + steps
    scale = float(reference.k.float().abs().max())
    cache_error = float((native.k.float() - reference.k.float()).abs().max()) / scale
    cache_error = max(cache_error, float((native.v.float() - reference.v.float()).abs().max())
                      / float(reference.v.float().abs().max()))
    return logit_error, cache_error


@pytest.mark.parametrize(("positions", "norm", "activation", "bias"), list(itertools.product(
    ["sinusoidal", "learned", "rope"], ["layernorm", "rmsnorm"], ["relu", "gelu", "swiglu"],
    [True, False])))
def test_native_step_matches_the_model_fp32(positions, norm, activation, bias):
    model = random_model(positions=positions, norm=norm, activation=activation, bias=bias,
                         qkv_bias=bias, tie_embeddings=not bias)
    logit_error, cache_error = compare_steps(model)
    assert logit_error < 1e-5
    assert cache_error < 1e-5


@pytest.mark.parametrize(("positions", "activation"), [("sinusoidal", "relu"),
                                                       ("learned", "gelu"), ("rope", "swiglu")])
def test_native_step_matches_the_model_bf16(positions, activation):
    model = random_model(torch.bfloat16, positions=positions, activation=activation,
                         norm="rmsnorm" if positions == "rope" else "layernorm")
    logit_error, cache_error = compare_steps(model)
    assert logit_error < BF16_TOLERANCE
    assert cache_error < BF16_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("d_model", "heads"), [(96, 3), (96, 1), (288, 1)])
def test_native_step_matches_the_model_at_every_head_width(dtype, d_model, heads):
    # heads of 32 and 96 lanes (whole 16-lane chunks, more than four of them) and of 288 (past
    # the vector attention's 256: the scalar loops); CFG's heads of 24 end in a partial chunk
    model = random_model(dtype, d_model=d_model, num_heads=heads, positions="rope")
    logit_error, cache_error = compare_steps(model)
    limit = 1e-5 if dtype == torch.float32 else BF16_TOLERANCE
    assert logit_error < limit
    assert cache_error < limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_gives_the_same_logits_on_any_number_of_threads(dtype):
    # uneven parts: 3 threads over 4 heads, 384 feed-forward rows and 300 output rows
    model = random_model(dtype, positions="rope", activation="swiglu")
    decoder = native_decode.native_decoder(model)
    logits = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            cache = model.new_cache(1)
            logits.append(torch.cat([decoder.step(token, cache) for token in (5, 9, 2, 7)]))
    # which thread takes which rows changes from step to step, but every row is computed whole
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_sample_takes_the_native_step_and_gives_pytorchs_tokens():
    model = random_model()
    ctx = Context(model, [1, 2, 3])
    assert ctx.native is not None
    # 50 new tokens with context 24: the window slides; each slide re-runs through PyTorch.
    g = dataclasses.replace(GenerateConfig(), strategy="greedy", max_new_tokens=50)
    native = sample(model, [5, 17, 3, 40], g)[0]
    model.native_decode = False
    assert Context(model, [1, 2, 3]).native is None
    plain = sample(model, [5, 17, 3, 40], g)[0]
    assert native.tokens == plain.tokens and len(native.tokens) == 50
    assert native.logprob == pytest.approx(plain.logprob, rel=1e-4)
    sampled = dataclasses.replace(g, strategy="sample", top_k=5, max_new_tokens=20)
    plain_draw = sample(model, [5, 17], sampled, generator=torch.Generator().manual_seed(3))[0]
    model.native_decode = True
    native_draw = sample(model, [5, 17], sampled, generator=torch.Generator().manual_seed(3))[0]
    assert native_draw.tokens == plain_draw.tokens


def torch_pick(logits: torch.Tensor) -> tuple[int, float]:
    index = int(logits.argmax())
    return index, float(logits[0, index] - torch.logsumexp(logits[0], dim=0))


@pytest.mark.parametrize("size", [1, 15, 16, 17, 33, 300, 100_256])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_greedy_pick_is_torchs_argmax_and_logprob(size, scale):
    decoder = native_decode.native_decoder(random_model())
    generator = torch.Generator().manual_seed(size)
    logits = torch.randn(1, size, generator=generator) * scale
    logits[0, size // 3:size // 2] = float("-inf")  # banned ids
    index, logprob = decoder.pick(logits)
    expected_index, expected = torch_pick(logits)
    assert index == expected_index
    assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_greedy_pick_takes_the_first_of_equal_maxima(threads):
    decoder = native_decode.native_decoder(random_model())
    logits = torch.zeros(1, 3000)
    logits[0, 5] = 1.0  # a smaller maximum in an earlier 512-logit chunk
    logits[0, [2999, 1400, 1100, 600]] = 2.0  # in later chunks and other threads' shares
    with num_threads(threads):
        index, logprob = decoder.pick(logits)
    assert index == 600 == torch_pick(logits)[0]
    assert logprob == pytest.approx(torch_pick(logits)[1], rel=1e-6)


class CountingLibrary:
    """The native library, counting the greedy picks that take a pass of their own."""

    def __init__(self, lib):
        self.lib, self.picks = lib, 0

    def llm_decode_step(self, *args):
        return self.lib.llm_decode_step(*args)

    def llm_greedy_pick(self, *args):
        self.picks += 1
        return self.lib.llm_greedy_pick(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_step_gives_the_greedy_choice_of_its_own_logits(dtype, threads):
    # a vocabulary of 5,000: several 512-logit chunks a thread, maxima rising between them
    model = random_model(dtype, vocab_size=5000)
    decoder = native_decode.native_decoder(model)
    decoder.lib = CountingLibrary(decoder.lib)
    cache = model.new_cache(1)
    with num_threads(threads):
        for token in (5, 9, 2, 7):
            logits = decoder.step(token, cache)
            index, logprob = decoder.pick(logits)
            expected_index, expected = torch_pick(logits)
            assert index == expected_index
            assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-6)
            changed = logits.clone()  # processed logits (a ban here) get a pass of their own
            changed[0, index] = float("-inf")
            assert decoder.pick(changed)[0] == torch_pick(changed)[0] != index
    assert decoder.lib.picks == 4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_step_takes_the_first_of_equal_maxima(threads):
    # ids 3 and 250 get the same, largest logit: whichever thread takes which rows, id 3 wins
    model = random_model(bias=True, qkv_bias=True, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[250] = model.lm_head.weight[3]
        model.lm_head.bias[[3, 250]] = 1e3
    decoder = native_decode.native_decoder(model)
    cache = model.new_cache(1)
    with num_threads(threads):
        for token in (5, 9, 2, 7):
            logits = decoder.step(token, cache)
            assert logits[0, 3] == logits[0, 250] == logits.max()
            assert decoder.pick(logits)[0] == 3 == torch_pick(logits)[0]


def test_the_step_leaves_odd_logits_to_torch():
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    decoder = native_decode.native_decoder(model)
    logits = decoder.step(5, model.new_cache(1))
    assert torch.isnan(logits[0, 3]) and decoder.pick(logits) is None


def test_greedy_pick_leaves_odd_rows_to_torch():
    model = random_model()
    decoder = native_decode.native_decoder(model)
    nan, inf = torch.randn(1, 50), torch.randn(1, 50)
    nan[0, 7], inf[0, 9] = float("nan"), float("inf")
    for logits in (nan, inf, torch.full((1, 50), float("-inf")), torch.randn(2, 50),
                   torch.randn(1, 50, dtype=torch.bfloat16), torch.randn(1, 100)[:, ::2]):
        assert decoder.pick(logits) is None
    ctx = Context(model, [1, 2])
    for logits in (nan, inf, torch.full((1, 50), float("-inf"))):  # torch's answers stand
        chosen, logprob = ctx.greedy_pick(logits)
        assert chosen == [int(logits.argmax())] and not torch.isfinite(torch.tensor(logprob))


def test_models_the_step_does_not_cover_stay_in_pytorch():
    model = random_model()
    assert native_decode.native_decoder(model.train()) is None
    model.eval()
    lora = random_model()
    apply_lora(lora, dataclasses.replace(LoraConfig(), rank=2, targets=["qkv"]))
    assert native_decode.native_decoder(lora) is None  # unmerged adapters
    mixed = random_model()
    mixed.lm_head.to(torch.bfloat16)
    assert native_decode.native_decoder(mixed) is None
    assert native_decode.native_decoder(torch.nn.Linear(2, 2)) is None
    # several sequences (sampling, beam search) step through PyTorch: the same logits as with
    # the native step switched off
    steps = []
    for native in (True, False):
        model.native_decode = native
        ctx = Context(model, [1, 2])
        ctx.prefill(batch_size=3)
        with torch.inference_mode():
            steps.append(ctx.advance(torch.tensor([4, 5, 6])))
    assert steps[0].shape == (3, CFG.vocab_size) and torch.equal(steps[0], steps[1])


def test_bad_token_and_full_context_are_errors_not_crashes():
    model = random_model()
    decoder = native_decode.native_decoder(model)
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        decoder.step(CFG.vocab_size, cache)
    assert cache.length == 0
    cache.length = CFG.context_length
    with pytest.raises(ValueError, match="exceeds context_length"):
        decoder.step(1, cache)
    with pytest.raises(ValueError, match="batch-1 cache"):
        decoder.step(1, model.new_cache(2))


def test_library_builds_into_the_cache_and_falls_back_without_a_compiler(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_decode.library.cache_clear()
    try:
        assert native_decode.library() is not None
        built = list((tmp_path / "llmcli" / "native").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left
        assert native_decode.library() is native_decode.library()  # loaded once
        native_decode.library.cache_clear()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("PATH", str(tmp_path))
        assert native_decode.library() is None
        assert native_decode.native_decoder(random_model()) is None
        native_decode.library.cache_clear()
        monkeypatch.setenv("LLM_NATIVE_DECODE", "0")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert native_decode.library() is None
    finally:
        native_decode.library.cache_clear()
