"""Checkpoint + tokenizer + prompt text → generated text: the library behind `llm generate`.

`load_generator` rebuilds the model from a checkpoint and pairs it with the tokenizer and
vocabulary it was trained with; `generate_text` turns prompt text into finished texts (streamed
if asked), with the decoding itself in `llmcli.generate.decode`.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcli.console import fail, warn
from llmcli.data.instruct import ModelVocab, answer_end
from llmcli.data.templates import render_prompt
from llmcli.generate.decode import (
    BeamStep,
    Generation,
    SampleStep,
    beam_search,
    check_settings,
    prepare_model,
    sample,
)
from llmcli.generate.inspect import visible
from llmcli.generate.stream import StopBytes, TextStream, render
from llmcli.recipe import GenerateConfig, Recipe


@dataclass
class Generator:
    """A loaded model with its tokenizer: text in, text out."""

    model: torch.nn.Module
    recipe: Recipe
    meta: dict[str, Any]
    path: Path
    tokenizer: Any
    vocab: ModelVocab
    eos_id: int | None  # end-of-text as a model id; None when the vocabulary cannot hold it
    banned: list[int] = field(default_factory=list)  # model ids with no text

    @property
    def context_length(self) -> int:
        return int(self.recipe.model.context_length)

    def tokenizer_ids(self, ids: Sequence[int]) -> list[int]:
        if self.vocab.compact is None:
            return [int(i) for i in ids]
        return self.vocab.compact.to_tokenizer(ids)

    def token_bytes(self, model_id: int) -> bytes:
        if self.vocab.compact is not None:
            model_id = int(self.vocab.compact.ids[model_id])
        return self.tokenizer.token_bytes(model_id)

    def token_text(self, model_id: int) -> str:
        return self.token_bytes(model_id).decode("utf-8", errors="replace")

    def text_of(self, ids: Sequence[int]) -> str:
        return render([self.token_bytes(i) for i in ids if i != self.eos_id])[0]

    def document_start(self) -> list[int]:
        """The model ids a document begins with: the tokenizer's start ids (a BOS), else
        end-of-text, which precedes every document in training; [] when the vocabulary holds
        neither."""
        if self.tokenizer.start_ids:
            return self.vocab.map(list(self.tokenizer.start_ids))[0]
        return [self.eos_id] if self.eos_id is not None else []

    def encode(self, text: str) -> list[int]:
        """Prompt text → model ids, begun as a sequence begins (`encode_start`); an empty
        prompt is a document's start alone."""
        if not text:
            if not self.document_start():
                fail(f"empty prompt: this model's vocabulary ({self.vocab.vocab_size:,} ids) has "
                     f"no end-of-text token (id {self.tokenizer.eot_id:,}) to start from; "
                     "give a prompt")
            return self.document_start()
        ids = self.tokenizer.encode_start(text)
        unseen = []
        for token_id in ids:
            if not self.vocab.has(token_id):
                shown = visible(self.tokenizer.token_bytes(token_id))
                if self.vocab.compact is not None:  # as in training: the unknown id stands in
                    unseen.append(shown)
                    continue
                fail(f"prompt token {shown} ({self.tokenizer.name} id {token_id:,}) is outside "
                     f"this model's vocabulary of {self.vocab.vocab_size:,} ids; rephrase the "
                     "prompt without it")
        if unseen:
            warn(f"{len(unseen)} prompt token(s) never appeared in this model's training data "
                 f"and read as its unknown id: {', '.join(unseen[:5])}"
                 + (" ..." if len(unseen) > 5 else ""))
        return self.vocab.map(ids)[0]


def load_generator(spec: str | Path | None, device: str = "auto",
                   dtype: str | None = None) -> Generator:
    """The checkpoint (file, run directory, or newest run) ready to decode on `device`.

    dtype: fp32, bf16 or fp16; by default fp32 on CPU and the stored weights' dtype elsewhere.
    """
    from llmcli.checkpoint import Checkpoint
    from llmcli.data.tokenizer import get_tokenizer
    from llmcli.device import dtype_from_name, resolve_device

    target = resolve_device(device)
    ckpt = Checkpoint.open(spec)
    model = ckpt.load(target)
    if dtype is not None:
        torch_dtype = dtype_from_name(dtype)
    else:
        torch_dtype = torch.float32 if target.type == "cpu" else ckpt.stored_dtype()
    prepare_model(model, torch_dtype)
    tokenizer = get_tokenizer(ckpt.tokenizer)
    vocab = ModelVocab(int(ckpt.recipe.model.vocab_size), ckpt.vocab_map)
    eos_id = vocab.map([tokenizer.eot_id])[0][0] if vocab.has(tokenizer.eot_id) else None
    return Generator(model, ckpt.recipe, ckpt.meta, ckpt.path, tokenizer, vocab, eos_id,
                     textless_ids(tokenizer, vocab))


def padded_ids_notice(gen: Generator) -> str | None:
    """Ids beyond the tokenizer's (a vocabulary padded to a round size, common in imported
    checkpoints) are never generated: said once, since greedy text can then differ from
    transformers', which may pick them."""
    first, size = gen.tokenizer.n_vocab, gen.vocab.vocab_size
    if gen.vocab.compact is not None or size <= first:
        return None
    return (f"note: ids {first:,} to {size - 1:,} of the model have no text in its tokenizer (a "
            "padded vocabulary): they are never generated, and --show-probs ranks only ids "
            "with text")


def textless_ids(tokenizer: Any, vocab: ModelVocab) -> list[int]:
    """Model ids that stand for no text, which generation must never pick: a compact
    vocabulary's unknown id, ids the tokenizer lacks (gaps before its special tokens)."""
    if vocab.compact is not None:
        return [vocab.compact.unknown_id]
    ids = list(range(min(vocab.vocab_size, tokenizer.n_vocab), vocab.vocab_size))
    for token_id in range(min(vocab.vocab_size, tokenizer.n_vocab)):
        try:
            tokenizer.token_bytes(token_id)
        except ValueError:
            ids.append(token_id)
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Prompts


def instruct_prompt(gen: Generator, instruction: str,
                    input_text: str = "") -> tuple[str, list[str]]:
    """(prompt, stop strings) asking a fine-tuned model as its training did."""
    template = gen.meta.get("template")
    if not template:
        fail(f"{gen.path}: this checkpoint has no prompt template, so it was not fine-tuned on "
             "instructions (llm finetune); drop --instruct and give a plain prompt")
    if input_text.strip() and "{input}" not in str(template):
        fail(f"--input: {gen.path} was fine-tuned with a template that has no {{input}} field, "
             "so the input would be left out; put it in the --instruct text instead")
    stops = [s for s in gen.meta.get("stop") or [] if isinstance(s, str)]
    if gen.eos_id is None and not stops:
        _, stop = answer_end(gen.tokenizer, gen.vocab)
        stops.extend([stop] if stop else [])
    return render_prompt(str(template), instruction, input_text), stops


def window_notice(gen: Generator, prompt_len: int, max_new_tokens: int,
                  window: str = "slide") -> str | None:
    """The one-line notice for generations longer than the model's context."""
    total = prompt_len + max_new_tokens
    if total <= gen.context_length:
        return None
    how = ("cropped to the last context_length tokens at every step (the seed's rule)"
           if window == "crop" else "sliding window restarted on the last 3/4 of the context")
    return (f"prompt ({prompt_len} tokens) + up to {max_new_tokens} new tokens exceed the "
            f"model's context of {gen.context_length}: {how}; the model sees only the most "
            "recent tokens")


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class TextResult:
    text: str  # the generated text only (without the prompt, cut before a stop string)
    token_ids: list[int]  # tokenizer ids of the generated tokens (end-of-text included)
    logprob: float
    score: float
    finish: str
    generation: Generation

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "tokens": len(self.token_ids),
                "logprob": self.logprob, "score": self.score, "finish": self.finish}


def new_seed() -> int:
    return secrets.randbits(31)


def generate_text(
    gen: Generator,
    prompt_ids: Sequence[int],
    settings: GenerateConfig,
    *,
    num_sequences: int = 1,
    stop: Sequence[str] = (),
    seed: int | None = None,
    use_cache: bool = True,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[SampleStep | BeamStep], None] | None = None,
) -> list[TextResult]:
    """Generate from model ids; texts best first (beam) or in sampling order.

    `on_text` receives the text of a single greedy or sampled sequence as it is produced.
    """
    try:
        check_settings(settings, num_sequences)
    except ValueError as exc:
        fail(str(exc))
    stop = [s for s in stop if s]
    stop_fn = StopBytes(stop, gen.token_bytes) if stop else None
    common: dict[str, Any] = {"eos_id": gen.eos_id, "banned": gen.banned, "stop": stop_fn,
                              "use_cache": use_cache, "on_step": on_step}
    if settings.strategy == "beam":
        results = beam_search(gen.model, prompt_ids, settings, num_return=num_sequences,
                              **common)
    else:
        device = next(gen.model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(new_seed() if seed is None else seed)
        stream = TextStream(stop) if on_text is not None and num_sequences == 1 else None

        def on_token(row: int, token: int) -> None:
            if stream is not None:
                text = stream.push(gen.token_bytes(token))
                if text:
                    on_text(text)

        results = sample(gen.model, prompt_ids, settings, num_sequences=num_sequences,
                         generator=generator, on_token=on_token if stream else None, **common)
        if stream is not None:
            rest = stream.finish()
            if rest:
                on_text(rest)
    return [_text_result(gen, r, stop) for r in results]


def _text_result(gen: Generator, result: Generation, stop: Sequence[str]) -> TextResult:
    text_ids = [t for t in result.tokens if t != gen.eos_id]
    text, _ = render([gen.token_bytes(t) for t in text_ids], stop)
    return TextResult(text, gen.tokenizer_ids(result.tokens), result.logprob, result.score,
                      result.finish, result)


def compare(gen: Generator, prompt_ids: Sequence[int], settings: GenerateConfig,
            strategies: Sequence[str], *, stop: Sequence[str] = (), seed: int,
            use_cache: bool = True) -> list[tuple[str, TextResult]]:
    """The same prompt, settings and seed through several strategies."""
    rows = []
    for name in strategies:
        chosen = dataclasses.replace(settings, strategy=name)
        result = generate_text(gen, prompt_ids, chosen, stop=stop, seed=seed,
                               use_cache=use_cache)[0]
        rows.append((name, result))
    return rows
