"""The Hugging Face Hub, one way for `llm import` and `llm imagine`: ids, the cache, downloads.

Only the files an import reads are fetched (config, safetensors weights, tokenizer JSON): never
pickled weights, never code. A cached snapshot without all its weights (what an interrupted
download leaves) is not taken as the model: the download goes on. When the model is not (fully)
cached and the Hub cannot be used (HF_HUB_OFFLINE, no network), the run stops at once with one
line saying how to get it.

Every download runs under `download()`: the libraries' retry chatter and progress bars are
silenced, the first unanswered request or error answer ends it in one line (one timeout,
HF_HUB_ETAG_TIMEOUT or HF_HUB_DOWNLOAD_TIMEOUT, 10 s by default, not minutes of retries), a
gated repository says how to get access, and Ctrl-C ends the command at once.
"""

from __future__ import annotations

import contextlib
import http
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from llmcli.console import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    clip,
    fail,
    first_line,
    info,
    is_interactive,
    say_interrupted,
    settings,
)

T = TypeVar("T")

PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PROBE_SECONDS = 8.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
IMPORT_USE = "run llm import DIR"
# Where huggingface_hub says that a request failed, before it tries again (up to five times,
# with pauses of up to 8 s, each try waiting its whole timeout, for every file).
HUB_LOGGERS = ("huggingface_hub.file_download", "huggingface_hub.utils._http")
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3}) thrown while requesting \w+ (\S+)")


# ---------------------------------------------------------------------------------------------
# Ids, advice and the cache


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


def how_to_get(repo_id: str, use: str = IMPORT_USE) -> str:
    """How to bring a model here by hand; `use` says how the command then takes the folder."""
    from huggingface_hub import constants

    return (f"on a connected machine run `hf download {repo_id} --local-dir DIR` (older "
            f"huggingface_hub: `huggingface-cli download {repo_id} --local-dir DIR`), copy DIR "
            f"here and {use}, or fill the Hugging Face cache ({constants.HF_HUB_CACHE})")


def cached_snapshot(repo_id: str) -> Path | None:
    """The cache's snapshot folder of `repo_id`'s main revision, complete or not (what
    snapshot_download(local_files_only=True) finds, without its errors for a partial one)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def in_cache(path: str | os.PathLike[str]) -> bool:
    """Whether `path` lies in the Hugging Face cache (a file there is the library's, not the
    user's: it is mended by deleting it, not by editing it)."""
    from huggingface_hub import constants

    try:
        return Path(path).absolute().is_relative_to(Path(constants.HF_HUB_CACHE).absolute())
    except (OSError, ValueError):
        return False


def cached_repo_id(path: str | os.PathLike[str]) -> str | None:
    """The model id whose cache folder (models--OWNER--NAME) holds `path`, if one does."""
    folder = next((p for p in Path(path).parts if p.startswith("models--")), None)
    return folder.removeprefix("models--").replace("--", "/") if folder else None


def damaged_cache_advice(path: str | os.PathLike[str], repo_id: str) -> str:
    """What to do about a damaged file in the cache: huggingface_hub never checks a cached file
    again, so every later run would fail on it."""
    blob = Path(path).resolve()
    linked = f" and the blob it links to ({blob})" if blob != Path(path).absolute() else ""
    return (f"the Hugging Face cache holds a damaged copy; delete {path}{linked}, or run "
            f"`hf cache rm model/{repo_id}`, then run again to download it afresh")


# ---------------------------------------------------------------------------------------------
# Asking the Hub


def probe(repo_id: str, label: str, use: str = IMPORT_USE,
          timeout: float = PROBE_SECONDS) -> tuple[Any, str | None]:
    """(the Hub's model info, None), or (None, why the Hub cannot be reached: no answer within
    `timeout`, a refused connection). Any answer that says no (missing, gated, refused, an
    error) is one line and exit here, said as what it is.

    Runs in a daemon thread with a deadline, because a stalled DNS lookup ignores HTTP timeouts.
    """
    from huggingface_hub import model_info

    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["info"] = model_info(repo_id, timeout=timeout)
        except Exception as exc:  # reported to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if "info" in outcome:
        return outcome["info"], None
    error = outcome.get("error")
    if error is None:
        return None, f"no answer within {timeout:g} s"
    explain(error, repo_id, label, use)
    return None, first_line(error) or type(error).__name__


def explain(exc: BaseException, repo_id: str, label: str, use: str = IMPORT_USE) -> None:
    """Fail with one line when `exc` (or an error behind it: diffusers and transformers wrap
    them) is the Hub's answer saying no: gated, missing, or another error answer."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    chain = _chain(exc)
    if any(isinstance(e, GatedRepoError) for e in chain):
        fail(f"{label}: this model is gated; accept its licence on {repo_page(repo_id)} and "
             f"log in with `hf auth login`", EXIT_FAILURE)
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        fail(f"{label}: no such model on the Hugging Face Hub (or it is private: log in "
             f"with `hf auth login`); check the id, e.g. openai-community/gpt2")
    answer = next((e for e in chain if isinstance(e, HfHubHTTPError)
                   and getattr(e, "response", None) is not None), None)
    if answer is not None:
        hub_answered(label, answer.response.status_code, str(answer.response.url))


def repo_page(repo_id: str) -> str:
    """The repository's page on the Hub this process talks to (HF_ENDPOINT)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def hub_answered(label: str, status: int, url: str) -> NoReturn:
    """The Hub answered, with an error: say which, for what, and what helps."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    if status in (401, 403):
        advice = ("log in with `hf auth login` (HF_TOKEN) as a user with access, or check the "
                  "id")
    elif status == 429:
        advice = "too many requests for now; wait a few minutes and run again"
    else:
        advice = "try again later (what has arrived is kept)"
    fail(f"{label}: the Hugging Face Hub answered {status} {phrase} for {_hub_file(url)}; "
         f"{advice}", EXIT_FAILURE)


def _hub_file(url: str) -> str:
    """The file (or the model lookup) a Hub URL asks for."""
    path = url.split("?")[0]
    if "/resolve/" in path:
        return path.split("/resolve/", 1)[1].split("/", 1)[-1]
    return "the model lookup" if "/api/" in path else path


def hub_stopped(label: str, repo_id: str, detail: str, use: str = IMPORT_USE) -> NoReturn:
    fail(f"{label}: the Hugging Face Hub stopped answering during the download "
         f"({clip(detail, 200)}); check the network and run again (what has arrived is kept), "
         f"or {how_to_get(repo_id, use)}", EXIT_FAILURE)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def network_failure(exc: BaseException) -> BaseException | None:
    """The transport failure (no answer, refused, cut off) behind `exc`, if any: the libraries
    wrap it (diffusers in an OSError saying the file does not exist)."""
    errors: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP library, by version
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return next((e for e in _chain(exc) if isinstance(e, tuple(errors))), None)


# ---------------------------------------------------------------------------------------------
# Downloading


class HubFailure(BaseException):
    """The Hub stopped answering, or answered an error, during a download. A BaseException, as
    KeyboardInterrupt is, so that the libraries' retries and broad `except Exception` blocks let
    it through at once. `status` and `url` are set when it answered."""

    def __init__(self, detail: str, status: int | None = None, url: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.url = url


def _stop_at_first_failure(record: logging.LogRecord) -> None:
    """End the download at the Hub's first failed request, before the library retries it: a
    bounded wait (one timeout) instead of minutes of retries, and the failure said as it was
    (an error answer is not "no answer")."""
    from huggingface_hub import constants

    message = record.getMessage()
    if message.startswith("No local file found. Retrying"):  # a HEAD for a file failed
        error = _failed_head(record)
        response = getattr(error, "response", None)
        if response is not None:
            raise HubFailure(message, response.status_code, str(response.url))
        if error is None or "Timeout" in type(error).__name__:
            raise HubFailure(
                f"no answer to a file request within {constants.HF_HUB_ETAG_TIMEOUT} s")
        raise HubFailure(first_line(error))
    if (answered := _HTTP_ERROR.match(message)) is not None:
        raise HubFailure(message, int(answered[1]), answered[2])
    if "thrown while requesting" in message or message.startswith("Error while downloading"):
        raise HubFailure(message.split("\n")[0])


def _failed_head(record: logging.LogRecord) -> BaseException | None:
    """The error of the request huggingface_hub is about to retry: it only logs that it will,
    so the error is read from the logging function's frame (None if that ever changes)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == record.funcName:
            error = frame.f_locals.get("head_call_error")
            return error if isinstance(error, BaseException) else None
        frame = frame.f_back
    return None


class _Relay(logging.Handler):
    """Passes each record to a function (which may raise, to stop the library where it logs)."""

    def __init__(self, on_record: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self.on_record = on_record

    def emit(self, record: logging.LogRecord) -> None:
        self.on_record(record)


@contextlib.contextmanager
def library_log(names: tuple[str, ...], on_record: Callable[[logging.LogRecord], None],
                level: int = logging.WARNING) -> Iterator[None]:
    """Hand these library loggers' records to `on_record`: some news (weights left random, a
    request that failed) the libraries only log. Only --debug also prints them."""
    handler = _Relay(on_record)
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
        logger.propagate = settings["debug"]
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, (old_level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = propagate


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's chatter (retry lines, "Fetching N files" bars) would break the one-line
    output; downloads keep their bars on a terminal; --debug shows it all."""
    if settings["debug"]:
        yield
        return
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # "Retrying in 8s [Retry 5/5]" and the like
    bars = not is_interactive()
    if bars:
        disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            enable_progress_bars()


@contextlib.contextmanager
def leave_on_interrupt() -> Iterator[None]:
    """Ctrl-C ends the command at once (exit 130) while a model downloads or loads.
    huggingface_hub downloads in worker threads that a KeyboardInterrupt never reaches, and
    Python waits for them at exit (minutes of retries against a stalled Hub); library imports
    can swallow it. Leaving at once is safe: nothing of ours is written yet, and the library
    keeps what has arrived to resume from."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            say_interrupted()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def download(get: Callable[[], T], repo_id: str, label: str, use: str = IMPORT_USE) -> T:
    """Run `get` (a download, by whichever library) so that it ends in one line, exit 1, at the
    Hub's first failure (see the module doc); other errors are the caller's to explain."""
    try:
        with (leave_on_interrupt(), quiet_hub(),
              library_log(HUB_LOGGERS, _stop_at_first_failure, logging.INFO)):
            return get()
    except HubFailure as exc:
        if exc.status is not None:
            hub_answered(label, exc.status, exc.url)
        hub_stopped(label, repo_id, first_line(exc), use)
    except Exception as exc:
        explain(exc, repo_id, label, use)
        if (failure := network_failure(exc)) is not None:
            hub_stopped(label, repo_id, first_line(failure), use)
        raise


# ---------------------------------------------------------------------------------------------
# llm import's model


def fetch(repo_id: str) -> Path:
    """The snapshot folder of `repo_id`, from the cache when complete, else downloaded (which
    finishes an interrupted download)."""
    from huggingface_hub import constants, snapshot_download

    state = "not in the Hugging Face cache"
    cached = cached_snapshot(repo_id)
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
    model, reason = probe(repo_id, repo_id)
    if reason is not None:
        fail(f"{repo_id}: no such folder, {state}, and the Hugging Face Hub cannot be reached "
             f"({reason}); {how_to_get(repo_id)}", EXIT_FAILURE)
    refuse_pickles_only(repo_id, model)
    return download(lambda: Path(snapshot_download(repo_id, allow_patterns=PATTERNS)),
                    repo_id, repo_id)


def refuse_pickles_only(repo_id: str, model: Any) -> None:
    """A repository with pickled weights and no safetensors is refused before any download, as a
    local folder is (a pickle can run code when read)."""
    names = [getattr(s, "rfilename", "") for s in getattr(model, "siblings", None) or []]
    if not names or any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        fail(f"{repo_id}: the repository has only pickled weights ({pickles[0]}) and llm reads "
             "safetensors only (a pickle can run code when read), so nothing was downloaded; "
             "convert it with transformers (save_pretrained(DIR, safe_serialization=True)) and "
             "run llm import DIR")


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
