"""A Hugging Face model id as a local folder: the cache when it is there, else a download.

Only the files an import reads are fetched (config, safetensors weights, tokenizer JSON): never
pickled weights, never code. A cached snapshot without all its weights (what an interrupted
download leaves) is not taken as the model: the download goes on. When the model is not (fully)
cached and the Hub cannot be used (HF_HUB_OFFLINE, no network), the run stops at once with one
line saying how to get it, as `llm imagine` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmcli.console import EXIT_FAILURE, fail, first_line, info

PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
INDEX = "model.safetensors.index.json"
PROBE_SECONDS = 8.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(text: str) -> bool:
    """owner/name as the Hub takes it (its own validator: at most 96 characters, no '--' or
    '..'): anything else is refused at once, never sent to the Hub to fail there (exit 1)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if HUB_ID.fullmatch(text) is None:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def how_to_get(repo_id: str) -> str:
    from huggingface_hub import constants

    return (f"on a connected machine run `hf download {repo_id} --local-dir DIR` (older "
            f"huggingface_hub: `huggingface-cli download {repo_id} --local-dir DIR`), copy DIR "
            f"here and run llm import DIR, or fill the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})")


def fetch(repo_id: str) -> Path:
    """The snapshot folder of `repo_id`, from the cache when complete, else downloaded (which
    finishes an interrupted download)."""
    from huggingface_hub import constants, snapshot_download

    state = "not in the Hugging Face cache"
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True))
    except Exception:  # not cached (the library's error types vary between versions)
        cached = None
    if cached is not None:
        gap = missing(cached)
        if gap is None:
            return cached
        state = f"only partly in the Hugging Face cache ({gap} missing: an interrupted download?)"
    if constants.HF_HUB_OFFLINE:
        finish = "; unset HF_HUB_OFFLINE to finish the download, or " if cached else "; "
        fail(f"{repo_id}: no such folder, {state}, and HF_HUB_OFFLINE is set{finish}"
             f"{how_to_get(repo_id)}", EXIT_FAILURE)
    info(f"looking up {repo_id} on the Hugging Face Hub")
    reason = probe(repo_id)
    if reason is not None:
        fail(f"{repo_id}: no such folder, {state}, and the Hugging Face Hub cannot be reached "
             f"({reason}); {how_to_get(repo_id)}", EXIT_FAILURE)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except Exception as exc:  # network errors come in many types
        fail(f"{repo_id}: download failed ({first_line(exc)}); {how_to_get(repo_id)}",
             EXIT_FAILURE)


def missing(snapshot: Path) -> str | None:
    """What a cached snapshot lacks of a complete model (config.json, model.safetensors or a
    shard its index lists), or None: the files an interrupted download leaves out."""
    if not (snapshot / "config.json").is_file():
        return "config.json"
    index = snapshot / INDEX
    if not index.is_file():
        return None if (snapshot / "model.safetensors").is_file() else "model.safetensors"
    try:
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged index: the import names it
    absent = sorted({n for n in names if isinstance(n, str) and not (snapshot / n).is_file()})
    return f"shard {absent[0]}" if absent else None


def probe(repo_id: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when the Hub answers for `repo_id`, else why not (imagine's probe, shared)."""
    from llmcli.imagine import probe_hub

    return probe_hub(repo_id, timeout, label=repo_id)
