"""Text-to-image with a diffusers pipeline: the seed's sdxl-turbo step, done as a tool.

The pipeline is loaded once (safetensors only, no remote code) and reused for every image. Each
image `i` is drawn from its own CPU generator seeded `seed + i`, so any one of them can be redrawn
alone with `--seed seed+i`, and the same seed gives the same noise on every device. The settings
that made an image travel with it as PNG text chunks.

A Hugging Face model id is looked up in the local cache first; when it is not there and the Hub
cannot be reached (or HF_HUB_OFFLINE is set), the run stops at once with one line saying how to
get the model, instead of hanging in network retries; so does a download at the Hub's first
unanswered request (one HF_HUB_ETAG_TIMEOUT or HF_HUB_DOWNLOAD_TIMEOUT, 10 s by default).

A pipeline with a part missing or incomplete (a folder, a tokenizer without vocabulary, weights
the libraries would fill with random values) is refused before anything is drawn.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from llmcli.checkpoint import CHECKPOINTS_DIR
from llmcli.console import (
    EXIT_FAILURE,
    check_png_output,
    check_range,
    clip,
    fail,
    first_line,
    info,
    progress,
    settings,
    warn,
)

DEFAULT_MODEL = "stabilityai/sdxl-turbo"
IMAGES_DIR = CHECKPOINTS_DIR / "images"
MAX_SIDE = 4096
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
USE = "pass --model DIR"  # how imagine takes a folder downloaded by hand
DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRequest:
    """What to draw; the same fields end up in each PNG's metadata."""

    prompt: str
    negative: str | None = None
    steps: int = 1
    guidance: float = 0.0
    width: int = 512
    height: int = 512
    seed: int = 0
    num_images: int = 1

    @property
    def used_negative(self) -> str | None:
        """The negative prompt, when it shapes the image (guidance above 1): what the PNG and
        the report record, which say only what made the image."""
        return self.negative if self.guidance > 1.0 else None

    def validate(self) -> None:
        if not self.prompt.strip():
            fail("PROMPT is empty; describe the image, e.g. llm imagine \"a calm sea at dawn\"")
        if self.steps < 1:
            fail(f"--steps {self.steps}: must be at least 1 (turbo models need 1 to 4)")
        check_range("--guidance", self.guidance, 0, MAX_GUIDANCE, "0 for turbo models, 5-8 "
                    "others")
        for name, value in (("--width", self.width), ("--height", self.height)):
            if value < 8 or value > MAX_SIDE or value % 8:
                fail(f"{name} {value}: must be a multiple of 8 from 8 to {MAX_SIDE} "
                     f"(e.g. {max(8, min(MAX_SIDE, round(value / 8) * 8))})")
        if self.num_images < 1:
            fail(f"--num-images {self.num_images}: must be at least 1")
        if self.seed < 0 or self.seed + self.num_images - 1 > MAX_SEED:
            fail(f"--seed {self.seed}: must be from 0 to {MAX_SEED - self.num_images + 1}")


@dataclass
class LoadedPipeline:
    """A pipeline ready on its device, with how it was loaded (for the report and metadata)."""

    pipe: Any
    model: str
    device: Any
    dtype: Any
    variant: str | None
    seconds: float
    sdpa: bool


@dataclass
class SavedImage:
    path: Path
    seed: int
    seconds: float


@dataclass
class ImagineResult:
    loaded: LoadedPipeline
    request: ImageRequest
    images: list[SavedImage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        loaded, request = self.loaded, self.request
        return {
            "model": loaded.model,
            "pipeline": type(loaded.pipe).__name__,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "variant": loaded.variant,
            "sdpa": loaded.sdpa,
            "load_seconds": round(loaded.seconds, 3),
            "prompt": request.prompt,
            "negative": request.used_negative,
            "steps": request.steps,
            "guidance": request.guidance,
            "width": request.width,
            "height": request.height,
            "images": [{"path": str(img.path), "seed": img.seed,
                        "seconds": round(img.seconds, 3)} for img in self.images],
        }


# ---------------------------------------------------------------------------------------------
# Names and files


def random_seed() -> int:
    """A seed short enough to type back in."""
    return secrets.randbelow(2**32)


def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name stem from the prompt; keeps letters of any script (画一个大海 stays readable)."""
    text = re.sub(r"[^\w]+", "-", prompt.lower()).strip("-_")
    return text[:max_len].rstrip("-_") or "image"


def output_paths(out: str | Path | None, prompt: str, seed: int, count: int) -> list[Path]:
    """Where the images go: `out`, or checkpoints/images/<prompt>-<seed>.png; numbered if several.

    `out` may be a directory (existing, or written with a trailing slash: a str, as typed, since
    a Path drops the slash) for the default names. A file there that is not a PNG is refused:
    an image never replaces other work.
    """
    if out is not None and str(out) == "":  # Path("") is the current folder
        fail("-o: an empty path; give a PNG file name or a folder")
    default_name = f"{slug(prompt)}-{seed}.png"
    folder = isinstance(out, str) and out.endswith(("/", "\\"))
    out = Path(out) if out is not None else None
    if out is None:
        base = IMAGES_DIR / default_name
    elif out.is_dir() or folder:
        base = out / default_name
    else:
        base = out
        if base.name.lower() == ".png":  # a hidden file with no name, hard to find again
            fail(f"-o {out}: give the image a name, e.g. -o {out.with_name('image.png')}, or "
                 f"the folder, -o {out.parent}{os.sep}, for the default name")
        if base.suffix.lower() != ".png":
            fail(f"-o {out}: images are saved as PNG (their prompt and seed go in the PNG "
                 f"metadata); use a name ending in .png, e.g. -o {out.with_suffix('.png')}")
    _check_writable(base.parent)
    paths = [base]
    if count > 1:
        width = len(str(count))
        paths = [base.with_name(f"{base.stem}-{k:0{width}d}{base.suffix}")
                 for k in range(1, count + 1)]
    for path in paths:
        check_png_output(path, "-o")
    return paths


def _check_writable(directory: Path) -> None:
    """Catch an unwritable output place before the slow model load, not after it."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        fail(f"-o: {probe} is a file, so {directory} cannot be a folder for images; "
             "choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"-o: cannot write in {probe} (permission denied); choose another output path")


def png_metadata(request: ImageRequest, seed: int, model: str) -> dict[str, str]:
    """The text chunks written into each PNG (readable with `PIL.Image.open(p).text`)."""
    from llmcli import __version__

    return {
        "prompt": request.prompt,
        "negative_prompt": request.used_negative or "",
        "seed": str(seed),
        "steps": str(request.steps),
        "guidance": f"{request.guidance:g}",
        "model": model,
        "size": f"{request.width}x{request.height}",
        "software": f"llm imagine (llmcli {__version__})",
    }


def save_png(image: Any, path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: an interrupted run never leaves half a PNG behind."""
    from PIL.PngImagePlugin import PngInfo

    from llmcli.files import atomic_path

    chunks = PngInfo()
    for key, value in metadata.items():
        chunks.add_text(key, value)  # non-Latin-1 text (a Chinese prompt) becomes an iTXt chunk
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=chunks)


# ---------------------------------------------------------------------------------------------
# Finding the model


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a directory, or a hub id (cached or to download)."""

    name: str  # what from_pretrained gets
    is_dir: bool
    cached: bool  # a hub id whose model_index.json is in the local cache


def locate_model(model: str) -> ModelSource:
    """A local pipeline directory, or a Hugging Face model id (the repository may be remote)."""
    if not model.strip():
        fail(f"--model '': give a pipeline folder or a Hugging Face model id, e.g. "
             f"{DEFAULT_MODEL}")
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            fail(f"--model {model}: is a file; give a pipeline folder saved with "
                 "save_pretrained (it holds model_index.json) or a Hugging Face model id")
        if not (path / "model_index.json").is_file():
            fail(f"--model {model}: no model_index.json in this folder, so it is not a diffusers "
                 "pipeline; give the folder `hf download <id> --local-dir DIR` or "
                 "save_pretrained wrote")
        _check_model_index(model, path / "model_index.json")
        return ModelSource(str(path), is_dir=True, cached=False)
    from huggingface_hub import try_to_load_from_cache

    from llmcli.interop.hub import looks_like_hub_id

    if model.count("/") != 1 or not looks_like_hub_id(model):  # the Hub's own rules too
        _not_a_model(model)
    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    return ModelSource(model, is_dir=False, cached=cached)


def _not_a_model(model: str) -> NoReturn:
    fail(f"--model {clip(model, 120)}: no such folder, and not a Hugging Face model id "
         f"(owner/name of letters, digits, '-', '_' and '.', at most 96 characters, e.g. "
         f"{DEFAULT_MODEL})")


def _check_model_index(model: str, index: Path) -> None:
    """diffusers reads model_index.json without checking its shape: an empty or mistyped one
    would end in a KeyError or TypeError deep inside it."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"--model {model}: cannot read model_index.json ({first_line(exc)}); give the "
             "folder save_pretrained wrote")
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        fail(f"--model {model}: model_index.json names no pipeline class (\"_class_name\"), so "
             "it is not a diffusers pipeline; give the folder save_pretrained wrote")
    for name, entry in data.items():
        part = index.parent / name
        if _names_a_class(entry) and not (part.is_dir() and any(part.iterdir())):
            _incomplete(model, name, f"model_index.json names a {entry[1]} there")


def _names_a_class(entry: Any) -> bool:
    """Whether a model_index.json entry is a part to load (["transformers", "CLIPTokenizer"]),
    not a setting or a part left out ([null, null])."""
    return (isinstance(entry, list) and len(entry) == 2
            and all(isinstance(item, str) for item in entry))


def _incomplete(model: str, part: str, why: str) -> NoReturn:
    """A pipeline without one of its parts would load (libraries fill gaps with random weights or
    an empty tokenizer) and then draw noise or crash mid-way: refuse it before drawing."""
    fail(f"--model {model}: {part}/ is missing or incomplete ({why}); give a complete pipeline "
         "(the folder save_pretrained or `hf download ID --local-dir DIR` writes)")


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def how_to_get(model: str) -> str:
    from llmcli.interop.hub import how_to_get as hub_how_to_get

    return hub_how_to_get(model, USE)


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(name: str, device: Any) -> Any:
    """'auto' is fp16 on CUDA (half the memory, tensor cores) and fp32 elsewhere."""
    import torch

    from llmcli.device import dtype_from_name

    name = name.strip().lower()
    if name not in DTYPE_NAMES:
        fail(f"--dtype {name}: use {', '.join(DTYPE_NAMES)}")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name)


def _variants(dtype: Any) -> tuple[str | None, ...]:
    """Weight variants to try, best first: the fp16 files for fp16, else the full ones.

    The other choice is the fallback: a repository with no fp16 files still loads in fp16 (cast
    on load), and a folder holding only fp16 files still loads in fp32.
    """
    import torch

    return ("fp16", None) if dtype == torch.float16 else (None, "fp16")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers/transformers/huggingface_hub chatter (progress bars, deprecations, retries)
    would break the one-line output; --debug shows it all."""
    if settings["debug"]:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from llmcli.interop.hub import quiet_hub

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    diffusers_logging.disable_progress_bar()
    with quiet_hub(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _from_pretrained(name: str, dtype: Any, variants: tuple[str | None, ...],
                     local_only: bool) -> tuple[Any, str | None, list[WeightReport]]:
    """Try each weight variant; raise the first failure if none loads."""
    from safetensors import SafetensorError

    from llmcli.interop.hub import network_failure

    first: Exception | None = None
    for variant in variants:
        try:
            pipe, reports = _load_variant(name, dtype, variant, local_only)
            return pipe, variant, reports
        except (OSError, ValueError, SafetensorError) as exc:
            if network_failure(exc) is not None:
                raise  # the next variant would only wait for the network again
            first = first or exc
    assert first is not None
    raise first


def _load_variant(name: str, dtype: Any, variant: str | None,
                  local_only: bool) -> tuple[Any, list[WeightReport]]:
    """The pipeline, with what the libraries reported of missing or unused weights."""
    from diffusers import AutoPipelineForText2Image

    reports: list[WeightReport] = []
    from llmcli.interop.hub import library_log

    with library_log(WEIGHT_REPORT_LOGGERS,
                      lambda record: reports.extend(_weight_reports(record.getMessage()))):
        pipe = AutoPipelineForText2Image.from_pretrained(
            name, dtype=dtype, variant=variant, use_safetensors=True, local_files_only=local_only)
    return pipe, reports


# Where transformers and diffusers report the weights a part's files lack (which they fill with
# random values, or leave on the meta device) or hold unused: they only log it.
WEIGHT_REPORT_LOGGERS = ("transformers.modeling_utils", "diffusers.models.modeling_utils")
_REPORT_PART = re.compile(r"(?:checkpoint at|from:) (.+?)(?: and are newly| were not used|$)", re.M)
_ANSI = re.compile(r"\x1b\[[\d;]*m")


@dataclass(frozen=True)
class WeightReport:
    """A weight that a part's files lack ("MISSING") or hold unused ("UNEXPECTED")."""

    status: str
    part: str  # the pipeline folder's subfolder: unet, text_encoder, ...
    key: str


def _weight_reports(message: str) -> list[WeightReport]:
    """The first missing and first unexpected weight of one of the libraries' load reports:
    transformers 5's table ("key | MISSING"), or the sentences of diffusers and transformers 4
    ("... at DIR/unet and are newly initialized: ['conv_out.weight']", "... were not used ...")."""
    message = _ANSI.sub("", message)
    where = _REPORT_PART.search(message)
    if where is None:
        return []
    part = Path(where[1].strip()).name
    reports = []
    for status, sentence in (("MISSING", "newly initialized"), ("UNEXPECTED", "were not used")):
        found = (re.search(rf"^(\S.*?)\s*\|\s*{status}\b", message, re.M)
                 or re.search(rf"{sentence}[^\[]*\[\s*'([^',]+)", message))
        if found:
            reports.append(WeightReport(status, part, found[1].strip()))
    return reports


def _check_loaded(model: str, source: ModelSource, pipe: Any,
                  reports: list[WeightReport]) -> None:
    """Refuse a pipeline that loaded with a part missing or incomplete; warn of unused weights."""
    for report in reports:
        if report.status == "MISSING":
            _incomplete(model, report.part, f"its weights lack {report.key}, which would be "
                        "drawn with random values")
    for report in reports:  # all UNEXPECTED now
        warn(f"--model {model}: {report.part}/ holds weights its model does not use (e.g. "
             f"{report.key}); they are ignored")
    index = _model_index(source)
    required = {name for name, param in inspect.signature(type(pipe).__init__).parameters.items()
                if param.default is param.empty}
    for name, part in pipe.components.items():
        if part is None and index and (_names_a_class(index.get(name))
                                       or (name not in index and name in required)):
            _incomplete(model, name, f"{type(pipe).__name__} needs a {name} and none was loaded")
        if _is_empty_tokenizer(part):
            _incomplete(model, name, "the tokenizer has no vocabulary")
        if (meta := _meta_weight(part)) is not None:
            _incomplete(model, name, f"its weights lack {meta}")


def _model_index(source: ModelSource) -> dict[str, Any]:
    """The pipeline's model_index.json ({} when unreadable: then nothing is inferred from it)."""
    if source.is_dir:
        path: Any = Path(source.name) / "model_index.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source.name, "model_index.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, TypeError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_empty_tokenizer(part: Any) -> bool:
    """transformers builds a tokenizer that knows only its special tokens from a folder without
    vocabulary files; it turns every prompt into the same few ids."""
    special = getattr(part, "all_special_tokens", None)
    return special is not None and len(part) <= len(set(special))


def _meta_weight(part: Any) -> str | None:
    """A weight diffusers left on the meta device (not in the files): moving it would fail."""
    import torch

    if not isinstance(part, torch.nn.Module):
        return None
    return next((name for name, param in part.named_parameters() if param.is_meta), None)


def damaged_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a pipeline folder that cannot be read (a safetensors header or a JSON
    file cut short or overwritten), with why: the libraries' own errors do not name it."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*/*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as exc:
            return path, first_line(exc)
    return None


def _folder_error(folder: str, exc: Exception) -> str:
    """One line for a pipeline folder that would not load, with the likely fix."""
    if (damaged := damaged_file(Path(folder))) is not None:
        path, why = damaged
        return (f"--model {folder}: {path.relative_to(folder)}: cannot read it ({why}); the "
                "file is damaged or cut short: copy or download it again")
    for part in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        names = [f.name for f in part.iterdir() if f.suffix in WEIGHT_SUFFIXES]
        if names and not any(n.endswith(".safetensors") for n in names):
            return (f"--model {folder}: {part.name}/ has only pickled weights ({names[0]}) and "
                    "llm loads safetensors only; re-save the pipeline with "
                    "save_pretrained(DIR, safe_serialization=True)")
    return f"--model {folder}: cannot load this pipeline: {first_line(exc)}"




def _use_sdpa(pipe: Any) -> bool:
    """Put PyTorch's fused attention (scaled_dot_product_attention) on the UNet and VAE where
    they still have the plain processor; True when all their attention runs through it.

    Custom processors (IP-Adapter, transformer pipelines' own) are left as they are.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    fused = True
    for name in ("unet", "vae"):
        processors = getattr(getattr(pipe, name, None), "attn_processors", None) or {}
        if processors and all(type(p) is AttnProcessor for p in processors.values()):
            getattr(pipe, name).set_attn_processor(AttnProcessor2_0())
            processors = getattr(pipe, name).attn_processors
        fused = fused and all(type(p) is AttnProcessor2_0 for p in processors.values())
    return fused and hasattr(pipe, "unet")


def _download_pipeline(model: str, dtype: Any, variants: tuple[str | None, ...],
                       local_error: Exception | None) -> tuple[Any, str | None, list[WeightReport]]:
    """Download what is missing and load it; a Hub failure is one line, exit 1 (the one way
    every command downloads: llmcli.interop.hub.download)."""
    from safetensors import SafetensorError

    from llmcli.interop.hub import download

    try:
        return download(lambda: _from_pretrained(model, dtype, variants, False), model,
                        f"--model {model}", USE)
    except (OSError, ValueError, SafetensorError) as exc:
        _damaged_in_cache(model)
        cached = f" (cached copy: {first_line(local_error)})" if local_error else ""
        fail(f"--model {model}: download or load failed: {first_line(exc)}{cached}",
             EXIT_FAILURE)


def _damaged_in_cache(model: str) -> None:
    """A damaged file in the Hugging Face cache fails every later run (the library never checks
    a cached file again): name it and say how to clear it."""
    from llmcli.interop.hub import cached_snapshot, damaged_cache_advice

    snapshot = cached_snapshot(model)
    if snapshot is not None and (damaged := damaged_file(snapshot)) is not None:
        path, why = damaged
        fail(f"--model {model}: {path}: cannot read it ({why}); "
             f"{damaged_cache_advice(path, model)}", EXIT_FAILURE)


def _require_hub(model: str, partly_cached: bool) -> None:
    """Fail at once, in one line, when the model must come from a Hub that cannot be used."""
    state = "is only partly" if partly_cached else "is not"
    if _hub_offline():
        fail(f"--model {model}: {state} in the Hugging Face cache and HF_HUB_OFFLINE is set; "
             f"{how_to_get(model)}", EXIT_FAILURE)
    info(f"looking up {model} on the Hugging Face Hub")
    from llmcli.interop.hub import probe

    _, reason = probe(model, f"--model {model}", USE)
    if reason is not None:
        fail(f"--model {model}: {state} on this machine and the Hugging Face Hub cannot be "
             f"reached ({reason}); {how_to_get(model)}", EXIT_FAILURE)


def load_pipeline(model: str = DEFAULT_MODEL, device: Any = "auto",
                  dtype: str = "auto") -> LoadedPipeline:
    """Find, load and place a text-to-image pipeline; fails fast (one line) when offline.

    A folder or a cached hub id loads without touching the network; only what is missing is
    fetched, and only after the Hub has answered.
    """
    from llmcli.interop.hub import leave_on_interrupt

    with leave_on_interrupt():  # nothing is written while loading: Ctrl-C may end it at once
        return _load_pipeline(model, device, dtype)


def _load_pipeline(model: str, device: Any, dtype: str) -> LoadedPipeline:
    from safetensors import SafetensorError

    from llmcli.device import resolve_device

    LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError,  # noqa: N806
                   SafetensorError)

    if isinstance(device, str):
        device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = locate_model(model)
    if not source.is_dir and not source.cached:
        _require_hub(model, partly_cached=False)  # before the slow diffusers import
    variants = _variants(torch_dtype)
    with _quiet_libraries():
        from diffusers import AutoPipelineForText2Image  # noqa: F401 - import time is not load time

        start = time.perf_counter()
        pipe = variant = local_error = None
        reports: list[WeightReport] = []
        if source.is_dir or source.cached:
            try:
                pipe, variant, reports = _from_pretrained(source.name, torch_dtype, variants, True)
            except LOAD_ERRORS as exc:
                # KeyError, TypeError, AttributeError: configs of the wrong shape, read unchecked
                if source.is_dir:
                    fail(_folder_error(source.name, exc))
                local_error = exc
        if pipe is None:
            if source.cached:
                _damaged_in_cache(model)
                _require_hub(model, partly_cached=True)
            pipe, variant, reports = _download_pipeline(model, torch_dtype, variants,
                                                        local_error)
        _check_loaded(model, source, pipe, reports)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)  # our own bar follows the steps
        sdpa = _use_sdpa(pipe)
    return LoadedPipeline(pipe=pipe, model=model, device=device, dtype=torch_dtype,
                          variant=variant, seconds=time.perf_counter() - start, sdpa=sdpa)


# ---------------------------------------------------------------------------------------------
# Drawing


def draw(loaded: LoadedPipeline, request: ImageRequest, seed: int,
         on_step: StepCallback | None = None) -> Any:
    """One image (a PIL image) for `request`, from noise seeded with `seed`."""
    import torch

    pipe = loaded.pipe
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "width": request.width,
        "height": request.height,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    if request.negative:
        if "negative_prompt" not in accepted:
            fail(f"--negative: {type(pipe).__name__} takes no negative prompt; drop --negative")
        kwargs["negative_prompt"] = request.negative
    if on_step is not None and "callback_on_step_end" in accepted:
        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
            on_step(step + 1, int(getattr(pipeline, "num_timesteps", request.steps)))
            return tensors

        kwargs["callback_on_step_end"] = step_end
    with _quiet_libraries(), torch.inference_mode():
        result = pipe(**kwargs)
    return result.images[0]


def check_size(loaded: LoadedPipeline, request: ImageRequest) -> None:
    """Refuse a size the pipeline cannot make: it floors width and height to a multiple of its
    VAE's scale factor, and the PNG would be smaller than asked (and than its metadata says)."""
    factor = getattr(loaded.pipe, "vae_scale_factor", 8)
    if not isinstance(factor, int) or factor < 2:
        return
    for name, value in (("--width", request.width), ("--height", request.height)):
        if value % factor:
            near = min(-(-value // factor) * factor, MAX_SIDE // factor * factor)
            fail(f"{name} {value}: {type(loaded.pipe).__name__} ({loaded.model}) makes sides in "
                 f"multiples of {factor}; use e.g. {name} {near}")


def warn_cut_prompts(pipe: Any, request: ImageRequest) -> None:
    """Say once when a prompt is longer than the text encoder reads: diffusers cuts it with only
    a log line (hidden with the rest), so prompts that differ past the cut draw the same image
    while their PNGs record different prompts."""
    texts = [("the prompt", request.prompt)]
    if request.negative and request.guidance > 1.0:  # otherwise it is unused (warned already)
        texts.append(("--negative", request.negative))
    tokenizers = [tokenizer for name in ("tokenizer", "tokenizer_2")
                  if (tokenizer := getattr(pipe, name, None)) is not None]
    with _quiet_libraries():  # transformers' own "sequence length is longer" line
        for label, text in texts:
            cut = next(filter(None, (_cut(tokenizer, text) for tokenizer in tokenizers)), None)
            if cut is not None:
                count, window, dropped = cut
                warn(f"{label} is {count} tokens and the text encoder reads the first {window}; "
                     f"it ignores \"{clip(dropped, 60)}\"")


def _cut(tokenizer: Any, text: str) -> tuple[int, int, str] | None:
    """(tokens, window, the text past the window) when `text` does not fit; the counts include
    the start and end markers, as the window does."""
    window = getattr(tokenizer, "model_max_length", None)
    if not isinstance(window, int) or window > 100_000:  # "no limit" is a huge number
        return None
    ids = tokenizer(text, truncation=False).input_ids
    if len(ids) <= window:
        return None
    return len(ids), window, tokenizer.decode(ids[window - 1:-1]).strip()


def imagine(request: ImageRequest, out: str | Path | None = None, model: str = DEFAULT_MODEL,
            device: str = "auto", dtype: str = "auto",
            on_saved: Callable[[SavedImage], None] | None = None) -> ImagineResult:
    """Load once, then draw and save `request.num_images` images (seeds seed, seed+1, ...)."""
    request.validate()
    paths = output_paths(out, request.prompt, request.seed, request.num_images)
    if request.negative and request.guidance <= 1.0:
        warn("--negative needs --guidance above 1; it has no effect now")
    info(f"loading {model}")
    loaded = load_pipeline(model, device, dtype)
    weights = f" ({loaded.variant} weights)" if loaded.variant else ""
    attention = ", SDPA attention" if loaded.sdpa else ""
    info(f"loaded {type(loaded.pipe).__name__} in {loaded.seconds:.2f} s")
    info(f"on {loaded.device}, {str(loaded.dtype).removeprefix('torch.')}{weights}{attention}")
    check_size(loaded, request)
    warn_cut_prompts(loaded.pipe, request)
    result = ImagineResult(loaded=loaded, request=request)
    with progress() as bar:
        for index, path in enumerate(paths):
            seed = request.seed + index
            label = f"image {index + 1}/{len(paths)}" if len(paths) > 1 else "denoising"
            task = bar.add_task(label, total=request.steps)

            def on_step(done: int, total: int, task: Any = task) -> None:
                bar.update(task, completed=done, total=total)

            start = time.perf_counter()
            image = draw(loaded, request, seed, on_step)
            if loaded.device.type == "cuda":
                import torch

                torch.cuda.synchronize(loaded.device)
            seconds = time.perf_counter() - start
            save_png(image, path, png_metadata(request, seed, model))
            saved = SavedImage(path=path, seed=seed, seconds=seconds)
            result.images.append(saved)
            if on_saved is not None:
                on_saved(saved)
    return result
