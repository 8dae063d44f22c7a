"""`llm generate`: continue a prompt (or answer an instruction) with a trained checkpoint."""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from llmcli.commands.common import path_text
from llmcli.console import (
    as_utf8,
    check_range,
    fail,
    info,
    one_line,
    out,
    read_text_input,
    run_guarded,
    shell_word,
    warn,
)

STRATEGIES = ("greedy", "sample", "beam")


def command(
    checkpoint: str = typer.Argument(
        None, help="Checkpoint file, run directory (its latest step) or run name under "
        "checkpoints/. Default: the newest run.", show_default=False,
    ),
    prompt: str = typer.Argument(
        None, help="Text to continue. Default: --prompt-file, else standard input when piped, "
        "else empty (the start of a document).", show_default=False,
    ),
    prompt_file: Path = typer.Option(
        None, "--prompt-file", "-f", help="Read the prompt from FILE.", show_default=False,
        parser=path_text,
    ),
    batch: bool = typer.Option(
        False, "--batch", help="One prompt per line (of PROMPT, --prompt-file or stdin)."
    ),
    instruct: str = typer.Option(
        None, "--instruct", help="Ask a fine-tuned model this instruction, in its training "
        "template; prints only the answer.", show_default=False,
    ),
    input_text: str = typer.Option(
        None, "--input", help="Input text for --instruct (Alpaca's optional context).",
        show_default=False,
    ),
    strategy: str = typer.Option(
        None, "--strategy", "-s", help="greedy, sample or beam. Default: the checkpoint "
        "recipe's generate.strategy (like every option below).", show_default=False,
    ),
    max_new_tokens: int = typer.Option(
        None, "--max-new-tokens", "-n", help="Tokens to generate at most.", show_default=False
    ),
    temperature: float = typer.Option(
        None, "--temperature", "-t", help="Softmax temperature for sample; 0 = greedy.",
        show_default=False,
    ),
    top_k: int = typer.Option(
        None, "--top-k", help="Sample from the k most likely tokens (0 = off).",
        show_default=False,
    ),
    top_p: float = typer.Option(
        None, "--top-p", help="Sample from the smallest set with total probability p, "
        "in (0, 1].", show_default=False,
    ),
    min_p: float = typer.Option(
        None, "--min-p", help="Drop tokens below min_p × the top probability.",
        show_default=False,
    ),
    repetition_penalty: float = typer.Option(
        None, "--repetition-penalty", help="> 1 discourages tokens already present (CTRL).",
        show_default=False,
    ),
    num_beams: int = typer.Option(None, "--num-beams", help="Beams for beam search.",
                                  show_default=False),
    length_penalty: float = typer.Option(
        None, "--length-penalty", help="Beam score = sum log p / length^this (> 0 favours "
        "longer texts).", show_default=False,
    ),
    no_repeat_ngram_size: int = typer.Option(
        None, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0 = off).",
        show_default=False,
    ),
    window: str = typer.Option(
        None, "--window", help="Past the context: slide (restart on the last 3/4, cache "
        "reused; default) or crop (the last context_length tokens every step, the seed's).",
        show_default=False,
    ),
    num_return_sequences: int = typer.Option(
        None, "--num-return-sequences", help="Texts to return (default 1; beam: every beam).",
        show_default=False,
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="Stop when this text appears (repeatable); it is not printed.",
        show_default=False,
    ),
    seed: int = typer.Option(
        None, "--seed", help="Random seed for sampling (the same seed gives the same text).",
        show_default=False,
    ),
    compare: str = typer.Option(
        None, "--compare", help="Run several strategies on the same prompt and seed, side by "
        "side: e.g. greedy,beam,sample.", show_default=False,
    ),
    show_probs: bool = typer.Option(
        False, "--show-probs", help="For each step, show the top candidates, which survived "
        "top-k/top-p/min-p, and which was chosen.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print text, token ids and scores "
                                  "as JSON (one line per prompt with --batch)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(
        None, "--dtype", help="fp32, bf16 or fp16. Default: fp32 on CPU, else the checkpoint's.",
        show_default=False,
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute the whole context every step (slow; to compare)."
    ),
) -> None:
    """Generate text from a checkpoint: greedy, sampling or beam search, streamed as it comes.

    Examples: llm generate checkpoints/tiny "Once upon a time" --strategy beam --num-beams 4;
    llm generate --show-probs --top-p 0.9 "The"; llm generate --compare greedy,beam,sample;
    llm generate checkpoints/tiny-lora --instruct "Name three colours".
    """

    def body() -> None:
        from llmcli.generate.pipeline import load_generator, padded_ids_notice

        given = {
            "strategy": strategy, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repetition_penalty": repetition_penalty, "num_beams": num_beams,
            "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
            "window": window,
        }
        _check_flags(given, num_return_sequences, seed, dtype)
        spec, text = _positionals(checkpoint, prompt)
        text = None if text is None else as_utf8(text)
        strategies = _strategies(compare) if compare is not None else None
        if instruct is not None and (text is not None or prompt_file or batch):
            fail("--instruct replaces the prompt; give either --instruct or a prompt "
                 "(PROMPT, --prompt-file, --batch), not both")
        if text is not None and prompt_file is not None:
            fail("give the prompt either as PROMPT or with --prompt-file, not both")
        if stop and any(s == "" for s in stop):
            fail("--stop '': an empty stop text would end every answer at once; give the text "
                 "to stop at, e.g. --stop '\\n\\n'")
        if input_text is not None and instruct is None:
            fail("--input goes with --instruct (it is the instruction's context)")
        if strategies and (num_return_sequences or 0) > 1:
            fail("--compare shows one text per strategy; drop --num-return-sequences")
        if instruct is None and text is None:
            text = _read_prompt(prompt_file)

        gen = load_generator(spec, device, dtype)
        param = next(gen.model.parameters())
        info(f"{gen.path} · {gen.tokenizer.name} · context {gen.context_length} · "
             f"{param.device.type} {str(param.dtype).removeprefix('torch.')}")
        padding = padded_ids_notice(gen)
        if padding:
            info(padding)
        settings = dataclasses.replace(gen.recipe.generate,
                                       **{k: v for k, v in given.items() if v is not None})
        _warn_ignored(strategies or [settings.strategy], strategies is not None,
                      {**given, "seed": seed}, settings)
        stops = [as_utf8(s) for s in stop or []]
        show_prompt = True
        if instruct is not None:
            from llmcli.generate.pipeline import instruct_prompt

            text, extra = instruct_prompt(gen, as_utf8(instruct), as_utf8(input_text or ""))
            stops += [s for s in extra if s not in stops]
            show_prompt = False
        prompts = [line for line in text.splitlines() if line.strip()] if batch else [text]
        if not prompts:
            fail("--batch: no prompts (every line is empty); give one prompt per line")
        run = _Run(gen, settings, stops, seed, num_return_sequences, not no_cache, json_out,
                   show_probs, show_prompt, batch)
        for one in prompts:
            if strategies:
                run.compare(one, strategies)
            else:
                run.generate(one)

    run_guarded(body)


def _check_flags(given: dict[str, Any], num_return: int | None, seed: int | None,
                 dtype: str | None) -> None:
    """The flags' ranges before a checkpoint is loaded: the recipe's rule for the generate keys
    (recipe.check_generate, through decode.check_settings), and the others'."""
    from llmcli.generate.decode import MAX_SEQUENCES, check_settings
    from llmcli.recipe import GenerateConfig

    flags = dataclasses.replace(GenerateConfig(), **{k: v for k, v in given.items()
                                                     if v is not None})
    try:
        check_settings(flags)
    except ValueError as exc:
        fail(str(exc))
    check_range("--num-return-sequences", num_return, 1, MAX_SEQUENCES)
    check_range("--seed", seed, 0, 2**63 - 1, "e.g. --seed 42")
    if dtype is not None:
        from llmcli.device import dtype_from_name

        dtype_from_name(dtype)


def _positionals(checkpoint: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """One positional is the checkpoint when it names one, otherwise it is the prompt.

    A lone argument is a guess either way, so a doubtful one is said out loud: a path that does
    not exist is refused with how to pass it as a prompt, and a prompt that looks like a
    mistyped run name gets a warning.
    """
    from llmcli.checkpoint import CHECKPOINTS_DIR

    if checkpoint is None:
        return None, prompt
    if checkpoint == "" and prompt is None:  # a lone empty argument: an empty prompt
        return None, ""
    if (CHECKPOINTS_DIR / checkpoint).is_dir() and not Path(checkpoint).exists():
        checkpoint = str(CHECKPOINTS_DIR / checkpoint)
    spaced = any(c.isspace() for c in checkpoint)
    exists = Path(checkpoint).exists()
    names_a_file = exists or checkpoint.endswith(".safetensors") or (
        "/" in checkpoint and not spaced)
    if prompt is None and names_a_file and not exists:
        fail(f"{checkpoint}: no such checkpoint; to continue it as a prompt, name the "
             f"checkpoint first: llm generate RUN {shell_word(checkpoint)}")
    if prompt is None and not names_a_file:
        runs = sorted(p.name for p in CHECKPOINTS_DIR.glob("*/") if p.is_dir())
        close = difflib.get_close_matches(checkpoint, runs, n=1) if not spaced else []
        if close:
            warn(f"{checkpoint!r} is taken as the prompt (no run of that name); for the run "
                 f"{CHECKPOINTS_DIR / close[0]}, name it: llm generate {close[0]} [PROMPT]")
        return None, checkpoint
    return checkpoint, prompt


def _warn_ignored(strategies: list[str], compared: bool, given: dict[str, Any],
                  settings: Any) -> None:
    """Say so when an option given on the command line has no effect on the strategies run
    (the one, or those --compare lists)."""
    named = "--compare " + ",".join(strategies) if compared else f"{strategies[0]} search"
    if compared and given["strategy"] is not None:
        warn(f"--strategy {given['strategy']}: ignored; --compare runs each strategy it lists")
    sampling = [k for k in ("temperature", "top_k", "top_p", "min_p", "seed")
                if given[k] is not None]
    if "sample" not in strategies and sampling:
        flags = ", ".join("--" + k.replace("_", "-") for k in sampling)
        fix = "add sample to --compare" if compared else "use --strategy sample"
        warn(f"{flags}: {named} picks tokens by score, not by sampling, and ignores them; {fix}")
    beam_only = [k for k in ("num_beams", "length_penalty") if given[k] is not None]
    if "beam" not in strategies and beam_only:
        flags = ", ".join("--" + k.replace("_", "-") for k in beam_only)
        warn(f"{flags}: only beam search uses beams (this is {named})")
    if compared and "sample" in strategies and settings.temperature == 0:
        warn("--compare: sample at temperature 0 is greedy; give --temperature above 0 to "
             "sample")


def _strategies(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        fail(f"--compare {spec!r}: use a comma-separated list of {', '.join(STRATEGIES)}")
    return names


def _read_prompt(prompt_file: Path | None) -> str:
    if prompt_file is not None:
        text = read_text_input(prompt_file, f"--prompt-file {prompt_file}")
    elif sys.stdin is None:  # closed (`<&-`): read as an empty pipe, like < /dev/null
        text = ""
    elif not sys.stdin.isatty():
        text = read_text_input(None, "standard input")
    else:
        return ""
    # The newline that ends a file or an echo is not part of the prompt.
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def _write(text: str) -> None:
    out.file.write(text)
    out.file.flush()


class _Run:
    """Generates for each prompt and prints the way the options ask."""

    def __init__(self, gen: Any, settings: Any, stops: list[str], seed: int | None,
                 num_return: int | None, use_cache: bool, json_out: bool, show_probs: bool,
                 show_prompt: bool, batch: bool) -> None:
        self.gen, self.settings, self.stops = gen, settings, stops
        self.seed, self.use_cache = seed, use_cache
        self.json_out, self.show_probs, self.show_prompt, self.batch = (
            json_out, show_probs, show_prompt, batch)
        beam = settings.strategy == "beam"
        self.num_return = num_return or (settings.num_beams if beam else 1)
        self.noticed = False

    def _ids(self, text: str) -> list[int]:
        from llmcli.generate.pipeline import window_notice

        ids = self.gen.encode(text)
        notice = window_notice(self.gen, len(ids), self.settings.max_new_tokens,
                               self.settings.window)
        if notice and not self.noticed:
            info(notice)
            self.noticed = True
        return ids

    def _seed(self) -> int:
        from llmcli.generate.pipeline import new_seed

        return self.seed if self.seed is not None else new_seed()

    def _emit_json(self, obj: dict[str, Any]) -> None:
        _write(json.dumps(obj, ensure_ascii=False, indent=None if self.batch else 2) + "\n")

    def generate(self, text: str) -> None:
        from llmcli.generate.decode import SampleStep, is_greedy
        from llmcli.generate.inspect import (
            beam_step_lines,
            result_line,
            sample_step_lines,
            step_json,
        )
        from llmcli.generate.pipeline import generate_text

        gen, g = self.gen, self.settings
        ids = self._ids(text)
        seed = self._seed()
        steps: list[dict[str, Any]] = []

        def on_step(step: Any) -> None:
            if self.json_out:
                steps.append(step_json(step, gen.token_text))
            elif isinstance(step, SampleStep):
                _write("\n".join(sample_step_lines(step, gen.token_bytes)) + "\n\n")
            else:
                lines = beam_step_lines(step, gen.token_bytes,
                                        lambda tokens: gen.text_of(ids[-16:] + tokens))
                _write("\n".join(lines) + "\n\n")

        streaming = (not self.json_out and not self.show_probs and g.strategy != "beam"
                     and self.num_return == 1)
        if streaming and self.show_prompt:
            _write(text)
        started = time.perf_counter()
        results = generate_text(
            gen, ids, g, num_sequences=self.num_return, stop=self.stops, seed=seed,
            use_cache=self.use_cache, on_text=_write if streaming else None,
            on_step=on_step if self.show_probs else None,
        )
        seconds = time.perf_counter() - started
        sampled = g.strategy != "beam" and not is_greedy(g)
        if self.json_out:
            obj: dict[str, Any] = {
                "checkpoint": str(gen.path), "prompt": text, "prompt_tokens": len(ids),
                "strategy": g.strategy,
                "settings": dataclasses.asdict(g), "stop": self.stops,
                "seed": seed if sampled else None,
                "results": [r.to_json() for r in results],
            }
            if self.show_probs:
                obj["steps"] = steps
            self._emit_json(obj)
            return
        shown = text if self.show_prompt else ""
        if streaming:
            _write("\n")
        elif len(results) == 1 and g.strategy != "beam":
            _write(shown + results[0].text + "\n")
        else:
            for i, r in enumerate(results, 1):
                _write(f"[{i}] {result_line(r.generation)}\n{shown}{r.text}\n\n")
        tail = f", seed {seed}" if sampled else ""
        if len(results) == 1:
            rate = len(results[0].token_ids) / seconds
            info(f"{result_line(results[0].generation)} · {rate:.1f} tokens/s{tail}")
        else:
            info(f"{len(results)} sequences in {seconds:.1f}s{tail}")

    def compare(self, text: str, strategies: list[str]) -> None:
        from llmcli.generate.inspect import compare_table
        from llmcli.generate.pipeline import compare

        if self.show_probs:
            warn("--show-probs is ignored with --compare")
        from llmcli.generate.decode import is_greedy

        ids = self._ids(text)
        seed = self._seed()
        rows = compare(self.gen, ids, self.settings, strategies, stop=self.stops, seed=seed,
                       use_cache=self.use_cache)
        sampled = "sample" in strategies and not is_greedy(
            dataclasses.replace(self.settings, strategy="sample"))
        if self.json_out:
            self._emit_json({
                "checkpoint": str(self.gen.path), "prompt": text, "prompt_tokens": len(ids),
                "seed": seed if sampled else None,
                "settings": dataclasses.asdict(self.settings), "stop": self.stops,
                "compare": [{"strategy": name, **r.to_json()} for name, r in rows],
            })
            return
        if self.show_prompt:
            _write(f"prompt: {one_line(text)}\n")
        out.print(compare_table([(name, r.text, r.generation) for name, r in rows],
                                width=out.width))
        if sampled:
            info(f"seed {seed}")
