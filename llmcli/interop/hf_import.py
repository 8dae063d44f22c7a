"""A transformers GPT-2 or Llama checkpoint → an llm run directory (`llm import`).

The folder (or Hub snapshot) must hold config.json and safetensors weights (model.safetensors,
or shards named by model.safetensors.index.json): pickled weights are refused unread. The result
is `checkpoints/<name>/step-00000000.safetensors` with a recipe that rebuilds the model exactly
(see `llmcli.interop.mapping`), so every command that takes a run directory takes it, and
`finetune.init=checkpoints/<name>` starts from it. Weights keep their stored dtype (float32
when the file mixes dtypes, which holds each exactly).

The tokenizer comes from the folder's tokenizer.json (stored by content, see
`llmcli.interop.tokenizer_store`); one that `llm export` wrote for cl100k_base or bytes is
recognised and becomes that tokenizer again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.checkpoint import CHECKPOINTS_DIR, save_model, step_path
from llmcli.console import check_readable, fail, first_line, info, warn
from llmcli.constants import RUN_TOKENIZERS
from llmcli.files import utf8_path
from llmcli.interop.hub import (
    INDEX,
    cached_repo_id,
    damaged_cache_advice,
    fetch,
    in_cache,
    looks_like_hub_id,
)
from llmcli.interop.mapping import (
    LLAMA,
    from_hf,
    head_untied,
    import_class,
    model_keys,
    zero_biases,
)
from llmcli.interop.staging import check_target, staged_folder
from llmcli.recipe import Recipe, build_recipe, check_name, name_problem

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_CHOICES = ("auto", "cl100k_base", "bytes")


@dataclass
class ImportResult:
    path: Path  # the checkpoint written
    source: Path  # the folder read
    cls: str
    recipe: Recipe
    tokenizer: str
    eos: str | None
    parameters: int
    dtype: str  # the run's
    stored: list[str]  # the file's dtypes: more than one when it mixed them


# ---------------------------------------------------------------------------------------------
# Reading the source


def locate(source: str) -> Path:
    """A local folder as it is; anything else must be a Hugging Face model id."""
    if not source:  # Path("") is the current folder
        fail("an empty SOURCE; give a folder written by save_pretrained or a Hugging Face "
             "model id such as openai-community/gpt2")
    path = Path(source).expanduser()
    if path.exists():
        check_readable(path)
        if not path.is_dir():
            fail(f"{source}: is a file; give a folder written by save_pretrained (config.json + "
                 "model.safetensors) or a Hugging Face model id such as openai-community/gpt2")
        return path
    if source.startswith((".", "/", "~")) or not looks_like_hub_id(source):
        fail(f"{source}: no such folder, and not a Hugging Face model id (owner/name, e.g. "
             "openai-community/gpt2)")
    return fetch(source)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    check_readable(path)
    if not path.is_file():
        fail(f"{folder}: no config.json, so this is not a transformers model folder; give the "
             "folder save_pretrained wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        fail(f"{path}: not readable JSON ({first_line(exc)})")
    if not isinstance(config, dict):
        fail(f"{path}: not a JSON object; the file is damaged")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights; pickles are named and refused, never read."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            fail(f"{index}: not a readable shard index ({first_line(exc)})")
        files = []
        for name in dict.fromkeys(names):
            if not isinstance(name, str) or Path(name).name != name or \
                    not name.endswith(".safetensors"):
                fail(f"{index}: names {str(name)[:60]!r}, not a .safetensors file in the folder")
            check_readable(folder / name)
            if not (folder / name).is_file():
                fail(f"{folder / name}: shard missing (listed in {INDEX})")
            files.append(folder / name)
        return files
    single = folder / "model.safetensors"
    check_readable(single)  # a pipe there is refused, not taken for a missing file
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    if pickled:
        fail(f"{folder}: the weights are only in pickled form ({pickled[0]}); llm reads "
             "safetensors only and never unpickles (a pickle can run code). Convert them where "
             "you trust the file, e.g. AutoModelForCausalLM.from_pretrained(DIR)"
             ".save_pretrained(NEW) writes model.safetensors, then import NEW")
    fail(f"{folder}: no model.safetensors (nor {INDEX}); give the folder save_pretrained wrote")


def read_weights(files: list[Path]) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in files:
        check_readable(path)  # a pipe would hang load_file; no permission is not "missing"
        try:
            part = load_file(utf8_path(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            repo = cached_repo_id(path) if in_cache(path) else None
            fix = (damaged_cache_advice(path, repo) if repo is not None  # mended by deleting it
                   else "was it fully written?")
            fail(f"{path}: cannot read its tensors ({first_line(exc)}); {fix}")
        clash = next((k for k in part if k in tensors), None)
        if clash is not None:
            fail(f"{path}: tensor {clash} is also in another shard; the shards do not fit")
        tensors.update(part)
    return tensors


def read_tokenizer(folder: Path, config: dict[str, Any], context_length: int,
                   choice: str = "auto") -> tuple[str, str | None, dict[str, bytes] | None]:
    """(tokenizer name, end-of-text token, the files the run keeps of a stored tokenizer) for
    the model in `folder`."""
    from llmcli.interop.tokenizer_export import EOT_TEXT, native_name
    from llmcli.interop.tokenizer_store import (
        check_decoder,
        check_post_processor,
        eos_token,
        store,
    )

    if choice not in TOKENIZER_CHOICES:
        fail(f"--tokenizer {choice}: use {', '.join(TOKENIZER_CHOICES)}")
    if choice != "auto":
        return choice, EOT_TEXT, None
    path = folder / "tokenizer.json"
    check_readable(path)  # a pipe is not "no tokenizer.json", and would hang the reader
    if not path.is_file():
        fail(f"{folder}: no tokenizer.json (a transformers fast tokenizer); save one beside the "
             "model with AutoTokenizer.from_pretrained(...).save_pretrained(DIR), or use llm's "
             "own with --tokenizer cl100k_base or --tokenizer bytes")
    native = native_name(path)
    if native is not None:
        return native, EOT_TEXT, None
    from tokenizers import Tokenizer

    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        fail(f"{path}: not a tokenizer the tokenizers library reads ({first_line(exc)})")
    check_decoder(json.loads(data).get("decoder"), str(path),
                  "use this model through transformers, or give a tokenizer.json with one of those")
    check_post_processor(tok, str(path))
    eos = eos_token(folder, tok, config)
    if eos is None:
        fail(f"{folder}: no end-of-text token found (tokenizer_config.json eos_token, config.json "
             "eos_token_id); add eos_token to tokenizer_config.json")
    name, files = store(data, eos, context_length)
    return name, eos, files


# ---------------------------------------------------------------------------------------------
# Converting


def default_output(source: str, folder: Path) -> Path:
    name = Path(source).name if Path(source).expanduser().exists() else source.split("/")[-1]
    return CHECKPOINTS_DIR / (name or folder.resolve().name)


def run_name(out: Path, given: bool, source: str, folder: Path) -> str:
    """The imported run's recipe name. The default output is checkpoints/<name>, so that name
    must be a run name; -o is a path, as for llm pretrain (any name the file system takes),
    and the run is named after its folder when that is a run name, else after the source."""
    if not given:
        return check_name(out.name, source, "or give the run directory with -o DIR")
    names = (out.name, default_output(source, folder).name)
    return next((name for name in names if not name_problem(name)), "imported")


def build_model(tensors: dict[str, Any], recipe: Recipe, where: str) -> Any:
    """Our model holding `tensors` (our names) as they are: built on `meta`, then assigned, so
    nothing is allocated twice and the stored dtype is kept."""
    import torch

    from llmcli.model.gpt import build_model as build

    model = build(recipe.model, device="meta")
    expected = model.state_dict()
    problems = [f"{k} (missing)" for k in expected if k not in tensors]
    problems += [f"{k} {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
                 for k, v in expected.items()
                 if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if problems:
        fail(f"{where}: weights do not match its config.json: {'; '.join(problems[:4])}; the "
             "folder's config and weights are from different models")
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            fail(f"{where}: weight {name} contains NaN or Inf values; the checkpoint is damaged")
    model.load_state_dict(tensors, strict=True, assign=True)
    if recipe.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model


def dtype_names(tensors: dict[str, Any]) -> list[str]:
    """The dtypes the weights are stored in, by name (float16, float32, ...)."""
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})


def common_dtype(tensors: dict[str, Any]) -> Any:
    """The one dtype the model is kept in: the stored one, or float32 when the file mixes
    dtypes (float32 holds float16 and bfloat16 exactly; a narrower one would round)."""
    import torch

    return next(iter(tensors.values())).dtype if len(dtype_names(tensors)) == 1 else \
        torch.float32


def note_zero_biases(config: dict[str, Any], recipe: Recipe, params: int, where: str) -> None:
    """Say so when the model holds more parameters than the source (`zero_biases`)."""
    which, added = zero_biases(config, recipe.model, where)
    if added:
        held = "attention_bias true, mlp_bias false" if which == "feed-forward" else \
            "mlp_bias true, attention_bias false"
        warn(f"{where}: {held}, which llm's model.bias does not set apart: {added:,} zero "
             f"{which} biases were added ({params:,} parameters, the source {params - added:,}); "
             "outputs are the same, but fine-tuning trains them and llm export writes both "
             "attention_bias and mlp_bias true")


def import_hf(source: str, out: Path | None = None, *, overwrite: bool = False,
              tokenizer: str = "auto") -> ImportResult:
    """Convert `source` (folder or hub id) into an llm run directory; see the module doc."""
    from llmcli.interop.tokenizer_store import add_run, write

    folder = locate(source)
    where = str(folder)
    given = out is not None
    out = Path(out) if given else default_output(source, folder)
    check_target(out, overwrite, "import")  # first: "-o ." is the current directory
    name = run_name(out, given, source, folder)
    config = read_config(folder)
    cls = import_class(config, str(folder / "config.json"))
    keys = model_keys(config, cls, str(folder / "config.json"))
    files = weight_files(folder)
    tok_name, eos, tok_files = read_tokenizer(folder, config, keys["context_length"], tokenizer)
    info(f"reading {len(files)} safetensors file(s) from {folder} ({cls})")
    tensors = read_weights(files)
    if keys["tie_embeddings"] and head_untied(tensors, cls):
        keys["tie_embeddings"] = False
        warn(f"{folder / 'config.json'}: tie_word_embeddings is true but the weights hold an "
             "lm_head.weight that differs from the token embedding; imported untied, as "
             "transformers loads it")
    recipe = build_recipe({"name": name, "data": {"tokenizer": tok_name, "vocab": "full"},
                           "model": keys}, where=f"{folder / 'config.json'} (as a recipe)")
    mapped = from_hf(tensors, recipe.model, cls, config, where)  # floats only
    dtype, stored = common_dtype(mapped), dtype_names(mapped)
    ours = {k: v.to(dtype) for k, v in mapped.items()}
    model = build_model(ours, recipe, where)
    from llmcli.model.count import unique_parameters

    params = sum(p.numel() for p in unique_parameters(model.named_parameters()).values())
    if cls == LLAMA:
        note_zero_biases(config, recipe, params, str(folder / "config.json"))
    with staged_folder(out, overwrite, "import") as tmp:
        if tok_files is not None:  # the run keeps its tokenizer: it works from anywhere
            write(tmp / RUN_TOKENIZERS / tok_name, tok_files)
        save_model(step_path(tmp, 0), model, recipe, tokenizer=tok_name, step=0,
                   imported_from=str(source), architecture=cls)
    add_run(out)
    from llmcli.data.tokenizer import get_tokenizer

    vocab, n_vocab = int(recipe.model.vocab_size), get_tokenizer(tok_name).n_vocab
    if n_vocab > vocab:
        warn(f"the tokenizer has {n_vocab:,} ids but the model's vocabulary only {vocab:,}: "
             "text that tokenizes to the others cannot be given to it")
    return ImportResult(step_path(out, 0), folder, cls, recipe, tok_name, eos, params,
                        str(dtype).removeprefix("torch."), stored)
