"""Decoding strategies on a model and token ids: greedy, sampling, beam search.

Everything here works on model ids and tensors (no tokenizer, no files), so tests can drive it
with a tiny random model. The prompt goes through the model in one forward pass; after that
each step feeds only the new token through the KV cache. Past the model's context_length the
window slides: the oldest tokens are dropped and the kept ones are run again (absolute
positions, learned or sinusoidal, and RoPE's table all stop at context_length, so cached keys
cannot simply be shifted). The uncached path slides by the same rule, so both give the same
tokens.

Per step, logits are processed in the order transformers uses: banned ids, repetition penalty,
no-repeat n-grams, then temperature, top-k, top-p and min-p. Scores are log-probabilities under
the model's distribution after the penalties, at temperature 1, so greedy, sampling and beam
search results can be compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmcli.recipe import GenerateConfig

NEG_INF = float("-inf")

# A callback told each generated row's tokens so far; True ends that row (stop strings).
StopFn = Callable[[list[int]], bool]


@dataclass
class Generation:
    """One finished sequence: generated model ids (an ending end-of-text included) and scores."""

    tokens: list[int]
    logprob: float  # sum of log p of the tokens (model distribution after penalties)
    score: float  # logprob / len(tokens) ** length_penalty
    finish: str  # "eos" | "stop" | "length" | "blocked" (every token was banned)


@dataclass
class SampleStep:
    """What the sampler saw at one step of one row, for `--show-probs`."""

    step: int
    row: int
    ids: list[int]  # the most probable candidates, best first (plus the chosen one if lower)
    ranks: list[int]  # 1-based rank of each candidate
    probs: list[float]  # probability at the sampling temperature, after penalties
    removed_by: list[str | None]  # which filter removed the candidate (None = kept)
    draw_probs: list[float]  # probability of being drawn (renormalised over kept tokens)
    chosen: int
    greedy: bool


@dataclass
class BeamCandidate:
    parent: int  # index of the running beam it extends
    token: int
    token_logprob: float
    total: float  # running sum of log p
    status: str  # "beam" | "eos" | "stop" | "dropped"


@dataclass
class BeamStep:
    step: int
    parents: list[list[int]]  # tokens of each running beam before this step
    candidates: list[BeamCandidate] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Settings


STRATEGIES = ("greedy", "sample", "beam")
MAX_SEQUENCES = 256  # sequences per prompt, as many as generate.num_beams allows beams


def check_settings(g: GenerateConfig, num_sequences: int = 1) -> None:
    """Raise ValueError naming the option for knobs outside their range.

    The ranges are `recipe.check_generate`'s, one rule for recipes and flags alike; this adds
    the strategy's name and the per-call number of sequences, which are not recipe keys.
    """
    from llmcli.console import UserError
    from llmcli.recipe import check_generate

    if g.strategy not in STRATEGIES:
        raise ValueError(f"--strategy {g.strategy!r}: use greedy, sample or beam")
    try:
        check_generate(g, "llm generate")
    except UserError as exc:  # generate.top_p -> --top-p: the flag a user of `generate` types
        flag = re.sub(r"\bgenerate\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(exc))
        raise ValueError(flag) from None
    if not 1 <= num_sequences <= MAX_SEQUENCES:
        raise ValueError(f"--num-return-sequences {num_sequences}: must be from 1 to "
                         f"{MAX_SEQUENCES}")
    if g.strategy == "beam" and num_sequences > g.num_beams:
        raise ValueError(f"--num-return-sequences {num_sequences}: beam search returns at most "
                         f"--num-beams ({g.num_beams}) sequences; raise --num-beams")
    if g.strategy == "greedy" and num_sequences > 1:
        raise ValueError(f"--num-return-sequences {num_sequences}: greedy search gives one "
                         "answer; use --strategy sample or beam")


def is_greedy(g: GenerateConfig) -> bool:
    return g.strategy == "greedy" or g.temperature == 0


# ---------------------------------------------------------------------------------------------
# The model, ready to decode


def prepare_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Eval mode, the decoding dtype, and the fast CPU paths for fp32 and bf16: weights in huge
    pages (`llmcli.model.huge_pages`), oneDNN matrix products (`llmcli.model.fast_decode`) and,
    for one sequence at a time, whole native decoding steps (`llmcli.model.native_decode`); same
    results to float rounding."""
    from llmcli.model.fast_decode import use_onednn_linears
    from llmcli.model.huge_pages import move_weights_to_huge_pages

    model.eval()
    if dtype is not None:
        model.to(dtype)
    move_weights_to_huge_pages(model)
    use_onednn_linears(model)
    model.native_decode = True  # Context takes the native step where the model allows it
    return model


class Context:
    """Growing sequences as the model sees them: the KV cache (or none) and the sliding window.

    `seq` holds every row's tokens (prompt and generated); `start` is where the model's window
    begins. When the window would exceed context_length it restarts at the last `keep` tokens,
    which are run through the model again: three quarters of the context (`window="slide"`:
    the cache serves the next quarter), or all of it (`window="crop"`, the seed's rule: the last
    context_length tokens at every step, each step a full forward pass).

    New tokens wait in a list until something reads `seq`: a step on the native path then costs
    no tensor operation at all. Between two native steps every tensor operation runs with cold
    caches (each step streams all the weights through them), 5-40 us each: the greedy loop's own
    work went from about 140 to 30 us a token (scifi dimensions, bf16, against a 3.3 ms step).
    """

    def __init__(self, model: torch.nn.Module, prompt: Sequence[int], use_cache: bool = True,
                 window: str = "slide"):
        if not prompt:
            raise ValueError("the prompt is empty; start from the end-of-text id")
        self.model = model
        self.context_length = int(model.cfg.context_length)
        self.keep = (self.context_length if window == "crop"
                     else max(1, self.context_length - self.context_length // 4))
        self.device = next(model.parameters()).device
        self._seq = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        self._new: list[list[int]] = []  # tokens appended since _seq was built, a list per step
        self.start = 0
        self.slides = 0
        self.cache = model.new_cache(1) if use_cache else None
        self.native = None
        if use_cache and getattr(model, "native_decode", False):
            from llmcli.model.native_decode import native_decoder

            self.native = native_decoder(model)

    @property
    def seq(self) -> torch.Tensor:
        """(rows, length) token ids."""
        if self._new:
            new = torch.tensor(self._new, dtype=torch.long, device=self.device)
            self._seq = torch.cat([self._seq, new.t()], dim=1)
            self._new = []
        return self._seq

    @property
    def batch_size(self) -> int:
        return self._seq.shape[0]

    @property
    def length(self) -> int:
        return self._seq.shape[1] + len(self._new)

    def _slide(self) -> bool:
        length = self.length
        if length - self.start <= self.context_length:
            return False
        self.start = length - self.keep
        self.slides += 1
        return True

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.native is not None and tokens.shape == (1, 1):
            return self.native.step(int(tokens), self.cache)
        logits, _ = self.model(tokens, cache=self.cache, last_only=True)
        return logits[:, -1].float()

    def greedy_pick(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Each row's argmax and its log-probability; for a single row, the native step's own
        choice or one native pass where the native step runs."""
        picked = self.native.pick(logits) if self.native is not None else None
        if picked is not None:
            return [picked[0]], [picked[1]]
        chosen = logits.argmax(dim=-1)
        return chosen.tolist(), _logprob_of(logits, chosen).tolist()

    def prefill(self, batch_size: int = 1) -> torch.Tensor:
        """Run the prompt once; (batch_size, vocab) logits for the first new token."""
        self._slide()
        logits = self._logits(self.seq[:, self.start:])
        if batch_size > 1:
            self.select(torch.zeros(batch_size, dtype=torch.long, device=self.device))
            logits = logits.expand(batch_size, -1)
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and copy) the given rows: beam search following its surviving beams."""
        self._seq = self.seq.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)

    def advance(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token per row; logits for the next one."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.view(-1).tolist()
        self._new.append(list(tokens))
        slid = self._slide()
        if self.cache is None:
            return self._logits(self.seq[:, self.start:])
        if slid:
            self.cache.crop(0)
            return self._logits(self.seq[:, self.start:])
        if self.native is not None and len(tokens) == 1:
            return self.native.step(tokens[0], self.cache)
        return self._logits(torch.tensor(tokens, device=self.device).view(-1, 1))


# ---------------------------------------------------------------------------------------------
# Logit processing


def apply_repetition_penalty(logits: torch.Tensor, seq: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already in the sequence are divided by `penalty` when
    positive and multiplied by it when negative (so > 1 always makes them less likely)."""
    seen = logits.gather(1, seq)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, seq, seen)


def ban_repeated_ngrams(logits: torch.Tensor, seq: torch.Tensor, size: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram of `size` already in the sequence."""
    length = seq.shape[1]
    if length < size:
        return logits
    vocab = logits.shape[1]
    grams = seq.unfold(1, size, 1)  # (rows, windows, size)
    suffix = seq[:, length - size + 1:]  # the last size-1 tokens
    match = (grams[..., :-1] == suffix.unsqueeze(1)).all(dim=-1)
    banned = torch.zeros(seq.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    # Windows that do not match point at a spare column past the vocabulary.
    banned.scatter_(1, torch.where(match, grams[..., -1].clamp(max=vocab), vocab), True)
    return logits.masked_fill(banned[:, :vocab], NEG_INF)


def changes_logits(g: GenerateConfig, banned: Sequence[int]) -> bool:
    """Whether `process_logits` has anything to do (else decoding skips it, and `seq`)."""
    return len(banned) > 0 or g.repetition_penalty != 1.0 or g.no_repeat_ngram_size > 0


def process_logits(logits: torch.Tensor, seq: torch.Tensor, g: GenerateConfig,
                   banned: torch.Tensor | None = None) -> torch.Tensor:
    """Banned ids, repetition penalty and n-gram ban: the model's adjusted distribution."""
    if banned is not None and banned.numel():
        logits = logits.index_fill(1, banned, NEG_INF)
    if g.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seq, g.repetition_penalty)
    if g.no_repeat_ngram_size > 0:
        logits = ban_repeated_ngrams(logits, seq, g.no_repeat_ngram_size)
    return logits


def _top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most probable tokens whose probabilities add up to >= top_p."""
    probs = torch.softmax(logits, dim=-1)
    vocab = probs.shape[-1]
    k = min(vocab, 256)
    while True:  # sort only the head of the distribution unless it is very flat
        head, index = probs.topk(k, dim=-1)
        if k == vocab or bool((head.sum(-1) >= top_p).all()):
            break
        k = min(vocab, k * 16)
    before = head.cumsum(-1) - head  # probability of the better tokens
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, keep_sorted)


def filter_masks(scaled: torch.Tensor, g: GenerateConfig) -> list[tuple[str, torch.Tensor]]:
    """(filter, tokens it keeps) for top-k, top-p, min-p in turn; each sees the earlier ones.

    Semantics as in transformers: top-k keeps every token tied with the k-th, top-p the smallest
    head reaching p, min-p the tokens with at least min_p x the top probability; the most
    probable token always survives.
    """
    masks: list[tuple[str, torch.Tensor]] = []
    keep: torch.Tensor | None = None

    def add(name: str, mask: torch.Tensor) -> None:
        nonlocal keep
        masks.append((name, mask))
        keep = mask if keep is None else keep & mask

    def survivors() -> torch.Tensor:
        return scaled if keep is None else scaled.masked_fill(~keep, NEG_INF)

    if g.top_k:
        kth = scaled.topk(min(g.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        add("top-k", scaled >= kth)
    if g.top_p is not None and g.top_p < 1:
        add("top-p", _top_p_keep(survivors(), g.top_p))
    if g.min_p:
        probs = torch.softmax(survivors(), dim=-1)
        add("min-p", probs >= g.min_p * probs.amax(-1, keepdim=True))
    return masks


def sampling_keep(scaled: torch.Tensor, g: GenerateConfig) -> torch.Tensor | None:
    """The tokens that survive every filter (None when no filter is on)."""
    keep = None
    for _, mask in filter_masks(scaled, g):
        keep = mask if keep is None else keep & mask
    return keep


def _logprob_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, tokens.view(-1, 1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# Greedy and sampling


def sample(
    model: torch.nn.Module,
    prompt: Sequence[int],
    g: GenerateConfig,
    *,
    num_sequences: int = 1,
    eos_id: int | None = None,
    banned: Sequence[int] = (),
    stop: StopFn | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    on_step: Callable[[SampleStep], None] | None = None,
    top_candidates: int = 5,
) -> list[Generation]:
    """Greedy search (strategy greedy or temperature 0) or sampling, `num_sequences` at once.

    `on_token(row, id)` hears each generated token as it comes (for streaming); an
    end-of-text is not passed on. `stop(tokens)` may end a row early (stop strings).
    """
    check_settings(g, num_sequences)
    greedy = is_greedy(g)
    with torch.inference_mode():
        ctx = Context(model, prompt, use_cache, g.window)
        banned_t = torch.tensor(list(banned), dtype=torch.long, device=ctx.device)
        processing = changes_logits(g, banned)
        logits = ctx.prefill(num_sequences)
        tokens: list[list[int]] = [[] for _ in range(num_sequences)]
        logprob = [0.0] * num_sequences
        finish: list[str | None] = [None] * num_sequences
        for step in range(1, g.max_new_tokens + 1):
            adjusted = process_logits(logits, ctx.seq, g, banned_t) if processing else logits
            if greedy:
                chosen_list, lp = ctx.greedy_pick(adjusted)
                scaled = keep = None
            else:
                scaled = adjusted / g.temperature
                keep = sampling_keep(scaled, g)
                drawn = scaled if keep is None else scaled.masked_fill(~keep, NEG_INF)
                probs = torch.softmax(drawn, dim=-1)
                blocked = ~torch.isfinite(drawn).any(-1)
                if bool(blocked.any()):
                    probs[blocked] = 1.0  # any id; the row ends as blocked below
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                lp = _logprob_of(adjusted, chosen).tolist()
                chosen_list = chosen.tolist()
            if on_step is not None:
                for row in range(num_sequences):
                    if finish[row] is None:
                        on_step(_sample_step(step, row, adjusted, scaled, keep, g,
                                             chosen_list[row], top_candidates))
            for row, tok in enumerate(chosen_list):
                if finish[row] is not None:
                    continue
                if not math.isfinite(lp[row]):
                    finish[row] = "blocked"
                    continue
                tokens[row].append(tok)
                logprob[row] += lp[row]
                if tok == eos_id:
                    finish[row] = "eos"
                    continue
                if on_token is not None:
                    on_token(row, tok)
                if stop is not None and stop(tokens[row]):
                    finish[row] = "stop"
            if all(f is not None for f in finish) or step == g.max_new_tokens:
                break
            logits = ctx.advance(chosen_list)
    return [_finished(t, lp, f or "length", g.length_penalty)
            for t, lp, f in zip(tokens, logprob, finish, strict=True)]


def _finished(tokens: list[int], logprob: float, finish: str,
              length_penalty: float) -> Generation:
    return Generation(tokens, logprob, length_normalised(logprob, len(tokens), length_penalty),
                      finish)


def length_normalised(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


def _sample_step(step: int, row: int, adjusted: torch.Tensor, scaled: torch.Tensor | None,
                 keep: torch.Tensor | None, g: GenerateConfig, chosen: int,
                 top: int) -> SampleStep:
    if scaled is None:  # greedy: the distribution at temperature 1, no filters
        probs = torch.softmax(adjusted[row], dim=-1)
        removed = None
        draw = probs
    else:
        probs = torch.softmax(scaled[row], dim=-1)
        masks = filter_masks(scaled[row:row + 1], g)
        removed = masks
        drawn = scaled[row] if keep is None else scaled[row].masked_fill(~keep[row], NEG_INF)
        draw = torch.softmax(drawn, dim=-1)
    order = probs.argsort(descending=True)
    ranks = {int(t): i + 1 for i, t in enumerate(order[:top].tolist())}
    if chosen not in ranks:
        ranks[chosen] = int((probs > probs[chosen]).sum()) + 1
    ids = list(ranks)
    reasons: list[str | None] = []
    for t in ids:
        reason = None
        if removed is not None:
            reason = next((name for name, mask in removed if not bool(mask[0, t])), None)
        reasons.append(reason)
    return SampleStep(step=step, row=row, ids=ids, ranks=[ranks[t] for t in ids],
                      probs=[float(probs[t]) for t in ids], removed_by=reasons,
                      draw_probs=[float(draw[t]) for t in ids], chosen=chosen,
                      greedy=scaled is None)


# ---------------------------------------------------------------------------------------------
# Beam search


def beam_search(
    model: torch.nn.Module,
    prompt: Sequence[int],
    g: GenerateConfig,
    *,
    num_return: int = 1,
    eos_id: int | None = None,
    banned: Sequence[int] = (),
    stop: StopFn | None = None,
    use_cache: bool = True,
    on_step: Callable[[BeamStep], None] | None = None,
) -> list[Generation]:
    """Keep the `num_beams` best partial sequences; return the best finished ones, best first.

    A sequence's score is its summed log-probability / length ** length_penalty. Each step ranks
    2 x num_beams extensions of the running beams: those ending (end-of-text or a stop string)
    join the finished list if they rank within num_beams, the rest refill the beams, and the
    cache follows the surviving beams. The search stops when no running beam can still beat
    the finished ones (an exact bound, so enough beams give exhaustive search).
    """
    check_settings(g, num_return)
    width, lp_exp, max_new = g.num_beams, g.length_penalty, g.max_new_tokens
    finished: list[Generation] = []
    with torch.inference_mode():
        ctx = Context(model, prompt, use_cache, g.window)
        device = ctx.device
        banned_t = torch.tensor(list(banned), dtype=torch.long, device=device)
        processing = changes_logits(g, banned)
        logits = ctx.prefill(1)
        beams: list[list[int]] = [[]]
        sums = torch.zeros(1, device=device)
        for step in range(1, max_new + 1):
            adjusted = process_logits(logits, ctx.seq, g, banned_t) if processing else logits
            logp = torch.log_softmax(adjusted, dim=-1)
            totals = (sums.unsqueeze(1) + logp).view(-1)
            top_totals, flat = totals.topk(min(2 * width, totals.numel()))
            vocab = logp.shape[1]
            record = BeamStep(step, [list(b) for b in beams]) if on_step else None
            rows, next_tokens, next_beams, next_sums = [], [], [], []
            for rank, (total, index) in enumerate(zip(top_totals.tolist(), flat.tolist(),
                                                      strict=True)):
                if not math.isfinite(total):
                    break
                parent, tok = divmod(index, vocab)
                seq = beams[parent] + [tok]
                status = "dropped"
                ending = "eos" if tok == eos_id else (
                    "stop" if stop is not None and stop(seq) else None)
                if ending:
                    if rank < width:
                        finished.append(_finished(seq, total, ending, lp_exp))
                        status = ending
                elif len(rows) < width:
                    rows.append(parent)
                    next_tokens.append(tok)
                    next_beams.append(seq)
                    next_sums.append(total)
                    status = "beam"
                if record is not None:
                    record.candidates.append(BeamCandidate(
                        parent, tok, float(logp[parent, tok]), total, status))
            if record is not None:
                on_step(record)
            finished.sort(key=lambda s: s.score, reverse=True)
            del finished[width:]
            beams = next_beams
            if not beams:
                break
            if step == max_new:
                finished.extend(_finished(b, s, "length", lp_exp)
                                for b, s in zip(beams, next_sums, strict=True))
                break
            if len(finished) >= width and _cannot_improve(next_sums, step, max_new, lp_exp,
                                                          finished[width - 1].score):
                break
            sums = torch.tensor(next_sums, device=device)
            ctx.select(torch.tensor(rows, dtype=torch.long, device=device))
            logits = ctx.advance(next_tokens)
    finished.sort(key=lambda s: s.score, reverse=True)
    return finished[:num_return]


def _cannot_improve(sums: list[float], length: int, max_new: int, length_penalty: float,
                    worst_kept: float) -> bool:
    """Whether every running beam's best possible final score is no better than `worst_kept`.

    Log-probabilities only add negative terms, so a beam with sum s ends with a score at most
    s / L ** length_penalty for some final length L in (length, max_new]; with s <= 0 that is
    largest at one end of the range.
    """
    best = max(sums)
    bound = max(best / (length + 1) ** length_penalty, best / max_new ** length_penalty)
    return bound <= worst_kept

