"""An llm checkpoint → a transformers folder (`llm export -o DIR`).

DIR holds config.json, generation_config.json, model.safetensors and the tokenizer
(tokenizer.json + tokenizer_config.json), so `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it with transformers' own classes, no custom code.
A LoRA adapter is exported merged into its base. The class follows the recipe (see
`llmcli.interop.mapping`); a recipe no transformers class computes exactly is refused in one
line that names the keys that would make it exportable. Weights keep the checkpoint's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmcli import __version__
from llmcli.checkpoint import Checkpoint
from llmcli.console import fail, warn
from llmcli.files import atomic_open, atomic_path, write_text
from llmcli.interop.mapping import export_class, hf_config, to_hf
from llmcli.interop.staging import EXPORT_MARK, check_target, staged_folder
from llmcli.interop.tokenizer_export import NATIVE, write_native

REGULAR_IDS = {"cl100k_base": 100256, "bytes": 256}  # ids below the special tokens


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    cls: str
    tokenizer: str
    eos_id: int | None
    parameters: int
    dtype: str
    files: list[str]


def export_hf(spec: str | Path | None, out: Path, *, overwrite: bool = False) -> ExportResult:
    """Write the checkpoint `spec` (file, run directory or None: the newest run) to `out`."""
    from safetensors.torch import save_file

    from llmcli.data.tokenizer import get_tokenizer

    ckpt = Checkpoint.open(spec)
    where = str(ckpt.path)
    cfg = ckpt.recipe.model
    if ckpt.vocab_map is not None:
        fail(f"{where}: compact vocabulary ({cfg.vocab_size:,} ids, each standing for a "
             f"{ckpt.tokenizer} id its corpus used): no transformers tokenizer gives these ids; "
             "export a model trained with data.vocab=full")
    cls = export_class(cfg, where)
    out = Path(out)
    check_target(out, overwrite, "export")
    tokenizer = get_tokenizer(ckpt.tokenizer)
    model = ckpt.load("cpu")  # an adapter comes back merged into its base
    dtype = ckpt.stored_dtype()
    tensors = {k: v.to(dtype).contiguous() for k, v in to_hf(model, cls).items()}
    params = sum(t.numel() for t in tensors.values())
    vocab = int(cfg.vocab_size)
    ordinary = REGULAR_IDS.get(ckpt.tokenizer, tokenizer.n_vocab)  # special tokens aside
    if ordinary > vocab:
        warn(f"the tokenizer has {ordinary:,} ids but the model's vocabulary only {vocab:,}: "
             "transformers will fail on text that tokenizes to the others")
    dtype_name = str(dtype).removeprefix("torch.")
    with staged_folder(out, overwrite, "export") as tmp:
        if ckpt.tokenizer in NATIVE:
            eos = write_native(tmp, ckpt.tokenizer, vocab, cfg.context_length)
            bos = eos
        else:
            from llmcli.interop.tokenizer_store import FILES, folder_of

            source = folder_of(ckpt.tokenizer)
            for name in FILES:
                with atomic_open(tmp / name, "wb") as fh:
                    fh.write((source / name).read_bytes())
            eos, bos = tokenizer.eot_id, None
        eos = eos if eos is not None and eos < vocab else None
        bos = bos if bos is not None and bos < vocab else None
        config = hf_config(cfg, cls, bos_id=bos, eos_id=eos, dtype=dtype_name)
        write_text(tmp / "config.json", config.to_json_string(use_diff=True))
        from transformers import GenerationConfig

        generation = GenerationConfig(bos_token_id=bos, eos_token_id=eos)
        write_text(tmp / "generation_config.json", generation.to_json_string(use_diff=True))
        with atomic_path(tmp / "model.safetensors") as path:
            save_file(tensors, str(path), metadata={"format": "pt", EXPORT_MARK: __version__})
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out, ckpt.path, cls, ckpt.tokenizer, eos, params, dtype_name, files)
