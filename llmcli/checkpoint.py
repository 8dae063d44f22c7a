"""The one home of checkpoints and run directories: every command reads and writes them here.

Layout of a run directory (`checkpoints/<recipe name>/` unless `-o`):

    step-00001000.safetensors          model weights + metadata (recipe, tokenizer, step, losses)
    step-00001000.trainer.safetensors  optimizer tensors, RNG and sampler state (for --resume)
    best.safetensors                   the weights with the lowest validation loss so far
    merged.safetensors                 a LoRA run's adapter merged into its base (--merge)
    metrics.jsonl, loss.png            what the run measured

A LoRA run's step files hold only the adapter; its metadata names the base checkpoint by a path
relative to the adapter file plus the base's SHA-256, so a run directory can move as a whole and
an adapter never silently loads onto other weights.

Weights are only ever read with safetensors: nothing here unpickles a file. Everything read from
a file (metadata, shapes, values) is validated before use, and problems are one-line errors that
name the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.console import (
    Echoed,
    UserError,
    check_readable,
    exit_code,
    fail,
    first_line,
    not_regular,
    warn,
)
from llmcli.constants import RUN_TENSORBOARD, TOKENIZER_VOCAB
from llmcli.files import Busy, locked, utf8_path
from llmcli.recipe import HF_TOKENIZER, Recipe, build_recipe

FORMAT = "llmcli-checkpoint/1"
TRAINER_FORMAT = "llmcli-trainer/1"
CHECKPOINTS_DIR = Path("checkpoints")
STEP_RE = re.compile(r"^step-(\d+)\.safetensors$")
BEST_NAME = "best.safetensors"
MERGED_NAME = "merged.safetensors"
# what a run writes beside its checkpoints, the TensorBoard folder included
RUN_FILES = ("metrics.jsonl", "loss.png", RUN_TENSORBOARD)
TOKENIZERS = ("cl100k_base", "bytes")
MAX_ADAPTER_DEPTH = 8  # an adapter on an adapter on ...: more than this is a loop or an attack
VANISHED_RETRIES = 5  # picks of a run directory's newest step while a training run prunes it


# ---------------------------------------------------------------------------------------------
# Run directories


def step_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:08d}.safetensors"


def trainer_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.replace(".safetensors", ".trainer.safetensors"))


def best_path(run_dir: Path) -> Path:
    return run_dir / BEST_NAME


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in a run directory, oldest first."""
    found = []
    for path in Path(run_dir).glob("step-*.safetensors"):
        match = STEP_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resumable_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Step checkpoints whose trainer state is there too, oldest first."""
    return [(s, p) for s, p in step_checkpoints(run_dir) if trainer_path(p).exists()]


def run_files(run_dir: Path) -> list[Path]:
    """Everything an earlier run left in `run_dir` that a new run would overwrite or mix with."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for _, p in step_checkpoints(run_dir)]
    found += [trainer_path(p) for p in found if trainer_path(p).exists()]
    found += [run_dir / n for n in (BEST_NAME, MERGED_NAME) if (run_dir / n).exists()]
    # an empty metrics.jsonl (or event folder) is a start that stopped before it logged
    # anything: not a run
    found += [run_dir / n for n in RUN_FILES if _holds_something(run_dir / n)]
    return found


def _holds_something(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and path.stat().st_size > 0


def latest_run(root: Path = CHECKPOINTS_DIR) -> Path | None:
    """The run directory under `root` with the most recently written checkpoint."""
    candidates = []
    for run_dir in Path(root).glob("*/"):
        files = [p for _, p in step_checkpoints(run_dir)] + list(run_dir.glob(BEST_NAME))
        if files:
            candidates.append((max(p.stat().st_mtime for p in files), str(run_dir), run_dir))
    return max(candidates)[2] if candidates else None


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (weights and trainer state); a step
    file another run's adapter names as its base is kept (see `record_dependent`)."""
    removed = []
    for _, path in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        users = dependents(path)
        if users:
            if path not in _told_kept:
                _told_kept.add(path)
                warn(f"kept {path} beyond train.keep_last: it is the base of the LoRA run "
                     f"{users[0]}; merge that run (llm finetune --merge {users[0]}) to let it go")
            continue
        for victim in (trainer_path(path), path):
            victim.unlink(missing_ok=True)
            removed.append(victim)
    return removed


_told_kept: set[Path] = set()  # one warning per kept file, not one per checkpoint


def _dependent_markers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.used-by.*"))


def record_dependent(base: Path, user_dir: Path) -> None:
    """Leave `.NAME.used-by.<id>` beside `base`, naming the run directory whose adapters load
    it: pruning and --overwrite in the base's run then keep the file. One marker per user, so
    concurrent fine-tunes never rewrite each other's."""
    import hashlib

    user = str(Path(user_dir).resolve())
    digest = hashlib.sha256(user.encode()).hexdigest()[:16]
    marker = base.with_name(f".{base.name}.used-by.{digest}")
    from llmcli.files import write_text

    try:
        if not marker.exists():
            write_text(marker, user + "\n")
    except (OSError, UserError) as exc:
        warn(f"{base.parent}: cannot record that {user_dir} uses {base.name} as its base "
             f"({first_line(exc)}); a run resumed there may prune it (raise train.keep_last)")


def dependents(path: Path) -> list[Path]:
    """The run directories whose adapters still name `path` as their base; markers of runs
    that are gone or moved on are removed."""
    users = []
    for marker in _dependent_markers(path):
        try:
            user = Path(marker.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError):
            continue  # unreadable: keep the marker, and the file with it
        if _uses(user, path):
            users.append(user)
        else:
            marker.unlink(missing_ok=True)
    return users


def _uses(user_dir: Path, base: Path) -> bool:
    """Whether an adapter in `user_dir` names `base` as its base (a run that has not saved
    one yet is taken to: it is starting, or it failed and is the user's to clear)."""
    if not user_dir.is_dir():
        return False
    target = base.resolve()
    adapters = step_checkpoints(user_dir)
    if not adapters:
        return True
    for _, adapter in adapters:
        stored = raw_metadata(adapter).get("base")
        if stored:
            try:
                named = json.loads(stored)
            except json.JSONDecodeError:
                continue
            if isinstance(named, str) and (adapter.parent / named).resolve() == target:
                return True
    return False


SAFETENSORS_TMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # the Rust tempfile crate's names


def sweep_temp_files(run_dir: Path) -> list[Path]:
    """Remove what an interrupted atomic write left behind.

    Only what the project wrote goes: `.NAME.XXXX.tmp` files and the private directories of
    `llmcli.files.atomic_path_in_private_dir`, and safetensors' own `.tmpXXXXXX` files (left by
    runs before those directories) when their header says an llm checkpoint or trainer state.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    swept = []
    for path in run_dir.glob(".*.tmp"):
        if path.is_symlink():
            continue
        if path.is_file():
            path.unlink(missing_ok=True)
            swept.append(path)
        elif path.is_dir() and all(p.is_file() and not p.is_symlink() for p in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    for path in run_dir.glob(".tmp*"):
        if (SAFETENSORS_TMP_RE.match(path.name) and path.is_file() and not path.is_symlink()
                and _header_format(path) in (FORMAT, TRAINER_FORMAT)):
            path.unlink(missing_ok=True)
            swept.append(path)
    return swept


def _header_format(path: Path) -> str | None:
    """The 'format' metadata of a safetensors header, read even when the tensors that follow it
    were never written; None when the file does not start with such a header."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta.get("format") if isinstance(meta, dict) else None


def prepare_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool,
                    inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse to mix a new run with an earlier one; sweep stale temporary files.

    Without `--resume` a directory holding another run's checkpoints is refused (exit 2): the
    new run would truncate its metrics, replace its best weights, and a later `--resume` would
    pick the old run's higher-step files. `--overwrite` deletes that run first. Metrics and a
    plot alone are a start that failed before its first checkpoint: nothing there can be
    resumed (`--resume` finds nothing), so refusing would leave no way but `--overwrite`; the
    new run replaces them, and says so. `inputs` ((what, path): the run's base, its data) must
    not be among what goes. Only the process holding the directory's lock may call this (see
    `claim_run_dir`), once the run's inputs are loaded: it deletes files.
    """
    run_dir = Path(run_dir)
    old = check_run_dir(run_dir, resuming=resuming, overwrite=overwrite)
    if old and not resuming:
        refuse_cleared_inputs(run_dir, old, inputs, overwrite)
        if all(p.name in RUN_FILES for p in old) and not overwrite:
            warn(f"{run_dir}: replacing {' and '.join(p.name for p in old)} of an earlier start "
                 "that stopped before saving a checkpoint")
        for path in old:
            users = dependents(path) if path.is_file() else []
            if users:
                fail(f"--overwrite: {path} is the base of the LoRA run {users[0]}, which would "
                     f"break; merge it first (llm finetune --merge {users[0]}) or write this "
                     "run elsewhere with -o DIR")
        for path in old:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    swept = sweep_temp_files(run_dir)
    if swept:
        warn(f"removed {len(swept)} unfinished temporary file(s) of an interrupted write in "
             f"{run_dir}")


def refuse_cleared_inputs(run_dir: Path, old: list[Path], inputs: Iterable[tuple[str, Path]],
                          overwrite: bool) -> None:
    """Refuse (exit 2) a run whose input (`inputs`: (what, path)) is one of the earlier run's
    files `old` that it would delete, or inside one: `finetune.init` naming the run being
    overwritten would leave neither the base nor a new run."""
    gone = [p.resolve() for p in old]
    for what, path in inputs:
        try:
            target = Path(path).resolve()
        except (OSError, RuntimeError):  # a symlink loop: it names none of them
            continue
        if any(target == victim or victim in target.parents for victim in gone):
            why = ("which --overwrite would clear" if overwrite else
                   "whose earlier start this run replaces")
            fail(f"{what} {path}: inside the run directory {run_dir}, {why}; write this run "
                 "elsewhere with -o DIR (or move the input out first)")


def refuse_contradiction(resuming: bool, overwrite: bool) -> None:
    if resuming and overwrite:
        fail("--resume and --overwrite contradict each other: --resume continues the run in "
             "the directory, --overwrite deletes it first; give one of them")


def check_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool) -> list[Path]:
    """The earlier run's files in `run_dir`; refuses (exit 2) to start a new run over them
    without --overwrite. Reads only: `llm pretrain --nproc N` asks before launching."""
    refuse_contradiction(resuming, overwrite)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"{run_dir}: exists and is not a directory; give -o a directory for the run")
    old = run_files(run_dir)
    if old and not resuming and not overwrite and not all(p.name in RUN_FILES for p in old):
        # --resume is only offered when it would work: otherwise the two messages send the
        # user back and forth
        how = ("continue it with --resume, replace it" if resumable_checkpoints(run_dir) else
               "it stopped before its first resumable checkpoint, so there is nothing to "
               "--resume; replace it")
        fail(f"{run_dir} already holds an earlier run ({len(old)} files, e.g. "
             f"{old[0].name}); {how} with --overwrite, or write this run elsewhere with "
             "-o DIR")
    return old


def run_kind(meta: dict[str, Any]) -> str:
    """"finetune" for a step checkpoint `llm finetune` wrote (it stores the prompt template;
    an adapter names its base), else "pretrain"."""
    return "finetune" if "template" in meta or "lora" in meta else "pretrain"


def check_run_kind(resume: Path, kind: str, meta: dict[str, Any] | None = None) -> None:
    """Refuse to continue one kind of run with the other command: a pretraining resume of a
    fine-tune drops its template and mixes its metrics; the converse lacks its sampler state.
    `meta`: the checkpoint's metadata when already read."""
    found = run_kind(raw_metadata(resume) if meta is None else meta)
    if found == kind:
        return
    where = resume.parent if resume.parent.name else Path(".")
    if found == "finetune":
        fail(f"--resume {resume}: {where} is a fine-tuning run; resume it with llm finetune "
             "RECIPE --resume, or pretrain into another directory with -o DIR")
    fail(f"--resume {resume}: {where} is a pretraining run; resume it with llm pretrain RECIPE "
         f"--resume, or fine-tune from it with finetune.init={resume} and -o DIR")


def set_aside_newer(run_dir: Path, resume: Path) -> Path | None:
    """Resuming from an older step of the run in `run_dir` starts a new branch: the old branch's
    newer steps (and its best and merged weights, if newer) move to `abandoned-<time>/` with a
    copy of metrics.jsonl, so nothing picks them up as this run's, and nothing is lost.

    Returns that directory, or None when there was nothing newer. A newer step that another
    run's adapter is based on stays where it is: the branch is refused instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or resume.parent.resolve() != run_dir.resolve():
        return None
    match = STEP_RE.match(resume.name)
    stored = match.group(1) if match else raw_metadata(resume).get("step")  # a renamed step
    if not isinstance(stored, str) or not stored.isdigit():
        return None
    step = int(stored)
    newer = [p for s, p in step_checkpoints(run_dir) if s > step]
    for name in (BEST_NAME, MERGED_NAME):
        extra = run_dir / name
        stored = raw_metadata(extra).get("step") if extra.is_file() else None
        if stored is not None and stored.isdigit() and int(stored) > step:
            newer.append(extra)
    if not newer:
        return None
    for path in newer:
        users = dependents(path) if path.is_file() else []
        if users:
            fail(f"--resume {resume}: the newer {path.name} is the base of the LoRA run "
                 f"{users[0]}, so this run cannot branch here; resume into another directory "
                 f"with -o DIR --resume {resume}")
    import time

    stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside = next(run_dir / f"{stamp}{n or ''}" for n in range(1000)
                 if not (run_dir / f"{stamp}{n or ''}").exists())
    aside.mkdir()
    moved = 0
    for path in newer:
        for victim in (path, trainer_path(path)):
            if victim.exists():
                os.replace(victim, aside / victim.name)
                moved += 1
    metrics = run_dir / RUN_FILES[0]
    if metrics.is_file():  # the new branch drops the records after its step from the original
        shutil.copy2(metrics, aside / metrics.name)
    warn(f"--resume {resume.name}: the run had gone on past step {step}; its {moved} newer "
         f"file(s) ({newer[-1].name}, ...) were moved to {aside} so they are not mixed with "
         "this branch (delete that folder if unwanted)")
    return aside


@dataclass
class RunClaim:
    """A run directory held for one training run (see `claim_run_dir`)."""

    run_dir: Path
    resume: Path | None  # the step checkpoint to continue; None for a fresh run
    overwrite: bool
    main: bool
    share: Callable[[Any], Any]

    def start(self, inputs: Iterable[tuple[str, Path]] = ()) -> None:
        """Make room for the run, now that every input is loaded and checked: set a resume's
        newer steps aside, delete the earlier run that --overwrite (or a fresh start over a
        failed one) replaces, sweep temporaries. Not before: a run refused on its base, its
        records or its corpus must leave the earlier one whole. `inputs` ((what, path)) among
        the files that would go are refused first. Every process of a group calls it."""
        _main_decides(lambda: _make_room(self, list(inputs)), self.main, self.share)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, *, resume: str | Path | bool | None, overwrite: bool,
                  main: bool = True, kind: str | None = None,
                  share: Callable[[Any], Any] | None = None) -> Iterator[RunClaim]:
    """A run directory held for the length of one training run: yields its `RunClaim` (the
    checkpoint to resume from, None for a fresh run; `start()`, called once the inputs are
    loaded, changes the directory). `kind` ("pretrain" / "finetune"): the command, whose
    resume must be of a run of its own kind.

    One run at a time per directory: two would interleave their metrics and replace each
    other's checkpoints. The process that writes (the main one of a process group) holds a lock
    beside the directory (`llmcli.files.locked`), taken first; a second run is refused, naming
    the first. What would be refused anyway (an earlier run without --overwrite, a resume of
    the wrong kind) is refused here, before anything is loaded. Only the main process looks at
    and changes the directory (deleting, setting aside, sweeping): a refused group must not
    touch the run that holds it. `share` (every process of a group calls it once per step:
    `distributed.from_main`) hands the main process's outcome to the others, which wait for
    it; a refusal ends them quietly with its exit code (`Echoed`).
    """
    share = share or (lambda value: value)
    with contextlib.ExitStack() as stack:
        resume_path = _main_decides(
            lambda: _claim(Path(run_dir), stack, resume, overwrite, kind), main, share)
        yield RunClaim(Path(run_dir), resume_path, overwrite, main, share)


def _main_decides(work: Callable[[], Any], main: bool, share: Callable[[Any], Any]) -> Any:
    """`work()` in the main process, its result handed to every process by `share`; a
    refusal there ends the others with its exit code."""
    outcome: tuple[Any, int | None] = (None, None)
    if main:
        try:
            outcome = (work(), None)
        except BaseException as exc:
            share((None, exit_code(exc)))
            raise
    value, refused = share(outcome)
    if refused is not None:
        raise Echoed(refused)
    return value


def _claim(run_dir: Path, stack: contextlib.ExitStack, resume: str | Path | bool | None,
           overwrite: bool, kind: str | None) -> Path | None:
    """claim_run_dir's work in the main process: lock, pick the resume, refuse what `start`
    would refuse about the directory (it reads only: nothing is changed before the inputs
    are loaded)."""
    refuse_contradiction(resume not in (None, False), overwrite)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        stack.enter_context(locked(run_dir, wait=False))
    except Busy as exc:
        by = f" (process {exc.holder})" if exc.holder.isdigit() else ""
        fail(f"{run_dir} is in use by another run{by}; wait for it to finish, or write "
             "this run elsewhere with -o DIR")
    resume_path = resolve_resume(resume, run_dir)
    if resume_path is not None and kind is not None:
        check_run_kind(resume_path, kind)
    branching = _branches(run_dir, resume_path)
    if branching:
        _refuse_mixing(run_dir, resume_path)
    check_run_dir(run_dir, resuming=resume_path is not None and not branching,
                  overwrite=overwrite)
    return resume_path


def _branches(run_dir: Path, resume: Path | None) -> bool:
    """Whether `resume` is another directory's checkpoint, continued into `run_dir`."""
    return resume is not None and resume.parent.resolve() != run_dir.resolve()


def _make_room(claim: RunClaim, inputs: list[tuple[str, Path]]) -> None:
    """RunClaim.start's work in the main process."""
    branching = _branches(claim.run_dir, claim.resume)
    if claim.resume is not None and not branching:
        set_aside_newer(claim.run_dir, claim.resume)
    prepare_run_dir(claim.run_dir, resuming=claim.resume is not None and not branching,
                    overwrite=claim.overwrite, inputs=inputs)


def _refuse_mixing(run_dir: Path, resume: Path) -> None:
    """Resuming another directory's checkpoint into `run_dir` starts a branch there: a run
    already in `run_dir` would have its metrics cut and its best replaced, and its higher
    steps would outlive (and be resumed instead of) the branch's."""
    old = run_files(run_dir)
    if old and not all(p.name in RUN_FILES for p in old):
        fail(f"--resume {resume}: {run_dir} holds a run of its own ({len(old)} files, e.g. "
             f"{old[0].name}), which this branch would mix with; resume into a new directory "
             "with -o DIR")


def default_run_dir(recipe: Recipe) -> Path:
    return CHECKPOINTS_DIR / recipe.name  # one safe path component: recipe.check_name


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint


@dataclass
class Checkpoint:
    """One checkpoint file with its validated metadata and recipe; `load()` builds the model."""

    path: Path
    meta: dict[str, Any]
    recipe: Recipe
    chosen_from: Path | None = None  # the run directory `path` was picked in, if any

    @classmethod
    def open(cls, spec: str | Path | None = None, root: Path = CHECKPOINTS_DIR) -> Checkpoint:
        """A file, a run directory (its newest good checkpoint) or nothing (the newest run)."""
        for attempt in range(VANISHED_RETRIES):
            path = resolve_checkpoint(spec, root)
            chosen_from = path.parent if spec is None or Path(spec).is_dir() else None
            try:
                return dataclasses.replace(cls.read(path), chosen_from=chosen_from)
            except UserError:
                # a training run writing the directory pruned the file after it was picked
                if chosen_from is None or path.exists() or attempt == VANISHED_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        meta = read_metadata(path)
        recipe = build_recipe(meta["recipe"], where=f"{path} (stored recipe)")
        check_metadata(meta, recipe, path)
        if str(meta.get("tokenizer", "")).startswith("hf-"):  # an imported run keeps its own
            from llmcli.interop.tokenizer_store import add_run

            add_run(path.parent)
        return cls(path, meta, recipe)

    @property
    def is_adapter(self) -> bool:
        return "lora" in self.meta

    @property
    def tokenizer(self) -> str:
        return str(self.meta.get("tokenizer") or self.recipe.data.tokenizer)

    @property
    def vocab_map(self) -> list[int] | None:
        return self.meta.get("vocab_map")

    @property
    def base_path(self) -> Path:
        """An adapter's base checkpoint, checked: present, not itself, the same bytes."""
        return adapter_base(self.path, self.meta)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes as stored (counting parameters without loading them)."""
        from safetensors import safe_open

        with safe_open(utf8_path(self.path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118

    def stored_dtype(self) -> Any:
        """The dtype of the first stored tensor (fp32 when unknown)."""
        import torch
        from safetensors import safe_open

        dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        with safe_open(utf8_path(self.path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                return dtypes.get(fh.get_slice(key).get_dtype(), torch.float32)
        return torch.float32

    def load(self, device: Any = "cpu", _depth: int = 0) -> Any:
        """The model in eval mode; an adapter comes back merged into its base.

        A step file chosen as a run directory's newest can be pruned by the run still training
        there before its tensors are read: the then newest one is loaded instead (and `path`,
        `meta` and `recipe` describe it).
        """
        for attempt in range(VANISHED_RETRIES):
            try:
                return self._load(device, _depth)
            except UserError:
                if self.path.exists():
                    raise
                if self.chosen_from is None or attempt == VANISHED_RETRIES - 1:
                    fail(f"{self.path}: removed while it was being read (a run still training "
                         "there prunes its older steps); try again, or give a file it keeps "
                         "such as best.safetensors")
                newer = Checkpoint.open(self.chosen_from)
                self.path, self.meta, self.recipe = newer.path, newer.meta, newer.recipe
        raise AssertionError("unreachable")

    def _load(self, device: Any, _depth: int) -> Any:
        from llmcli.model.gpt import build_model

        if self.is_adapter:
            return self._load_adapter(device, _depth)
        model = build_model(self.recipe.model, device=device)
        load_weights(model, self.path, strict=True, device=device)
        model.eval()
        return model

    def _load_adapter(self, device: Any, depth: int) -> Any:
        from llmcli.model.lora import apply_lora, load_lora_state, merge_lora

        if depth >= MAX_ADAPTER_DEPTH:
            fail(f"{self.path}: adapter chain deeper than {MAX_ADAPTER_DEPTH} (a loop of bases?); "
                 "merge the adapters with llm finetune --merge")
        base = Checkpoint.read(self.base_path)
        if dataclasses_differ(self.recipe.model, base.recipe.model):
            fail(f"{self.path}: the adapter was trained on a model shaped unlike its base "
                 f"{base.path}; give the base checkpoint it was trained on")
        model = base.load(device, depth + 1)
        tensors = read_tensors(self.path, device)
        check_weights(tensors, str(self.path))
        try:
            apply_lora(model, self.recipe.lora)
            load_lora_state(model, tensors)
        except ValueError as exc:
            fail(f"{self.path}: adapter does not fit its base {base.path} ({first_line(exc)})")
        merge_lora(model)
        model.eval()
        return model


def load_model(spec: str | Path | None, device: Any = "cpu") -> tuple[Any, Recipe, dict, Path]:
    """(model, recipe, metadata, path): the shorthand every command uses."""
    ckpt = Checkpoint.open(spec)
    return ckpt.load(device), ckpt.recipe, ckpt.meta, ckpt.path


def resolve_checkpoint(spec: str | Path | None, root: Path = CHECKPOINTS_DIR) -> Path:
    """A checkpoint file from a file, a run directory (newest step) or nothing (newest run).

    A damaged newest file is named, with the newest good one offered instead.
    """
    if spec is None:
        run_dir = latest_run(root)
        if run_dir is None:
            fail(f"no checkpoint given and none found under {root}/; train one first "
                 "(llm pretrain recipes/tiny.yaml) or pass a checkpoint path")
        spec = run_dir
    if str(spec) == "":  # Path("") is the current folder: an unset shell variable, not a choice
        fail("an empty checkpoint path; give a checkpoint file, run directory or run name")
    path = Path(spec)
    check_readable(path)  # a pipe would hang the reader; no permission is not "missing"
    if path.is_dir():
        candidates = [p for _, p in reversed(step_checkpoints(path))]
        candidates += [p for p in (path / MERGED_NAME, path / BEST_NAME) if p.exists()]
        if not candidates:
            fail(f"{path}: no checkpoint in this directory (expected step-*.safetensors); "
                 f"give a run directory written by `llm pretrain` or a .safetensors file"
                 f"{_import_hint(path)}")
        newest = candidates[0]
        problem = damage(newest)
        if problem is None:
            return newest
        if not newest.exists():  # pruned by a run training there since the listing: list again
            return resolve_checkpoint(path, root)
        good = next((p for p in candidates[1:] if damage(p) is None), None)
        offer = (f"the newest good one is {good}: pass it instead" if good else
                 "no other checkpoint there is readable")
        fail(f"{newest}: damaged checkpoint ({problem}); {offer}")
    if not path.exists():
        fail(f"{path}: checkpoint not found; give a .safetensors file or a run directory "
             f"such as {root}/tiny")
    if path.suffix != ".safetensors":
        fail(f"{path}: not a safetensors checkpoint; llm only loads .safetensors files "
             "(pickled .pt/.bin files are refused for safety)")
    if path.name.endswith(".trainer.safetensors"):
        fail(f"{path}: a trainer state, not model weights; give the step-*.safetensors beside it")
    return path


def damage(path: Path) -> str | None:
    """Why a checkpoint file cannot be used (unreadable, truncated, foreign), or None."""
    from safetensors import SafetensorError, safe_open

    check_readable(path)  # not damage: a pipe (would hang) or no permission, said as such
    try:
        with safe_open(utf8_path(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            keys = list(fh.keys())  # noqa: SIM118
            if keys:  # the last tensor's bytes are inside the file
                fh.get_slice(keys[-1])
    except (SafetensorError, OSError, ValueError) as exc:
        return first_line(exc)
    if raw.get("format") != FORMAT:
        return f"no '{FORMAT}' metadata"
    if _data_end(path) > path.stat().st_size:
        return "truncated (shorter than its header says)"
    return None


def raw_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata as stored (JSON strings), or {} when it is not one."""
    from safetensors import SafetensorError, safe_open

    if not_regular(path):  # a pipe would hang safe_open
        return {}
    try:
        with safe_open(utf8_path(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def _data_end(path: Path) -> int:
    """Where the last tensor ends, from the header; a file shorter than this is truncated."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + size + max(ends, default=0)


def _import_hint(folder: Path) -> str:
    """Where a transformers model folder (config.json beside the weights) was given for a
    checkpoint: the way to bring it in."""
    if not (folder / "config.json").is_file():
        return ""
    return (f"; {folder} holds a transformers model: bring it in with `llm import {folder} -o "
            "checkpoints/NAME`")


def read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, JSON-decoded; a foreign or broken file is a one-line error."""
    problem = damage(path)
    if problem is not None:
        fail(f"{path}: not an llm checkpoint it can use ({problem}); give a checkpoint written "
             f"by `llm pretrain` or `llm finetune`{_import_hint(path.parent)}")
    from safetensors import safe_open

    with safe_open(utf8_path(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            meta[key] = value
    if not isinstance(meta.get("recipe"), dict):
        fail(f"{path}: its metadata has no recipe mapping, so the model cannot be rebuilt; "
             "the file was not written by llm or was altered")
    return meta


def check_resume_recipe(recipe: Recipe, meta: dict[str, Any], resume: Path,
                        keys: tuple[str, ...]) -> None:
    """`keys` fix what a run trains on (its split, its data order): the saved sampler state
    carries on whatever they say, so a changed one would be ignored, or recorded unused. It is
    refused, named, with the saved value (a key the checkpoint predates is not checked)."""
    saved = meta.get("recipe")
    for dotted in keys if isinstance(saved, dict) else ():
        section, key = dotted.split(".")
        part = saved.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        theirs, mine = part[key], getattr(getattr(recipe, section), key)
        if json.loads(json.dumps(mine)) != theirs:
            fail(f"--resume {resume}: {dotted} is {_as_typed(mine)}, but the run was trained "
                 f"with {_as_typed(theirs)}, and a resumed run keeps the split and data order "
                 f"it started with; resume with {dotted}={_as_typed(theirs)}, or start a new "
                 "run elsewhere (-o DIR)")


def _as_typed(value: Any) -> str:
    """A recipe value as an override would give it (null, true, 0.1, alpaca), quoted with
    escapes when it holds line breaks (a template's text): the error stays one line."""
    plain = not (value is None or isinstance(value, bool)
                 or (isinstance(value, str) and not value.isprintable()))
    return str(value) if plain else json.dumps(value)


def check_metadata(meta: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """Every metadata field a command relies on has the type and range it must have."""
    def bad(key: str, why: str) -> None:
        fail(f"{path}: metadata '{key}' {why}; the file was not written by llm or was altered")

    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and tokenizer not in TOKENIZERS and not (
            isinstance(tokenizer, str) and HF_TOKENIZER.fullmatch(tokenizer)):
        bad("tokenizer", f"is {str(tokenizer)[:40]!r}, not one of {', '.join(TOKENIZERS)} or an "
            "imported hf-<digest>")
    vocab_map = meta.get("vocab_map")
    if vocab_map is not None:
        if not isinstance(vocab_map, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in vocab_map):
            bad("vocab_map", "is not a list of token ids")
        if any(not 0 <= i < 2**31 for i in vocab_map) or vocab_map != sorted(set(vocab_map)):
            bad("vocab_map", "holds ids out of range or out of order")
        if len(vocab_map) + 1 != recipe.model.vocab_size:
            bad("vocab_map", f"has {len(vocab_map)} ids + unknown, but the model's vocabulary is "
                f"{recipe.model.vocab_size}")
        limit = TOKENIZER_VOCAB.get(tokenizer or recipe.data.tokenizer)
        if limit is not None and vocab_map and vocab_map[-1] >= limit:
            bad("vocab_map", f"holds id {vocab_map[-1]:,}, beyond the {limit:,} ids of the "
                f"{tokenizer or recipe.data.tokenizer} tokenizer it names")
    elif recipe.data.vocab == "compact" and "lora" not in meta:
        bad("vocab_map", "is missing, but the model was trained on a compact vocabulary "
            "(data.vocab: compact) and its ids mean nothing without it")
    for key in ("template", "base", "base_sha256"):
        if key in meta and not isinstance(meta[key], str):
            bad(key, "is not a string")
    if "template" in meta and "{instruction}" not in meta["template"]:
        bad("template", "has no {instruction} field")
    stop = meta.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        bad("stop", "is not a list of strings")
    if "lora" in meta:
        if not isinstance(meta["lora"], dict):
            bad("lora", "is not a mapping")
        if not meta.get("base"):
            bad("base", "is missing from a LoRA adapter")


def adapter_base(path: Path, meta: dict[str, Any]) -> Path:
    """The base checkpoint an adapter file names, checked before anything is loaded."""
    stored = str(meta.get("base") or "")
    base = Path(stored)
    if not base.is_absolute():
        base = path.parent / base
    if not base.is_file():
        fail(f"{path}: LoRA adapter whose base checkpoint {stored!r} is missing (looked for "
             f"{base}); put the base back, or use a merged checkpoint (llm finetune --merge)")
    if base.resolve() == path.resolve():
        fail(f"{path}: LoRA adapter that names itself as its base; the file was altered")
    want = meta.get("base_sha256")
    if want:
        from llmcli.files import sha256_file

        if sha256_file(base) != want:
            fail(f"{path}: its base {base} has changed since the adapter was trained (SHA-256 "
                 "differs); restore that base, or merge the adapter while it still matches")
    return base


def base_reference(adapter_dir: Path, base: Path, sha256: str | None = None) -> dict[str, str]:
    """Metadata naming `base` from an adapter written in `adapter_dir` (see the module doc).
    `sha256`: the base's, when known: a resumed full fine-tune keeps the one it recorded,
    as its base may have moved or gone since."""
    from llmcli.files import sha256_file

    try:
        relative = os.path.relpath(Path(base).resolve(), Path(adapter_dir).resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop in either path
        fail(f"{adapter_dir}: cannot resolve the run directory or its base {base} ({exc}); "
             "give a plain directory with -o")
    return {"base": relative, "base_sha256": sha256 or sha256_file(Path(base))}


def dataclasses_differ(a: Any, b: Any, ignore: tuple[str, ...] = ("dropout",)) -> bool:
    """Whether two configs differ in anything but `ignore` (dropout shapes no weight)."""
    return any(getattr(a, f.name) != getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name not in ignore)


# ---------------------------------------------------------------------------------------------
# Tensors: the one weight loader


def read_tensors(path: Path, device: Any = "cpu") -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_readable(path)
    try:
        return load_file(utf8_path(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        fail(f"{path}: cannot read its tensors ({first_line(exc)}); was it fully written?")


def load_weights(model: Any, path: Path, *, strict: bool = True, device: Any = "cpu") -> None:
    """Load a weights file into `model`: shapes must match, values must be finite."""
    load_tensors(model, read_tensors(path, device), str(path), strict=strict)


def load_tensors(model: Any, tensors: dict[str, Any], where: str, strict: bool = True) -> None:
    """Put `tensors` into `model`; a mismatch names the keys, NaN/Inf weights and weights that
    are not floats are refused."""
    expected = model.state_dict()
    tensors = dict(tensors)
    for names in tied_names(model):  # safetensors stores a tied tensor under one of its names
        present = [n for n in names if n in tensors]
        for name in names:
            if present and name not in tensors:
                tensors[name] = tensors[present[0]]
    problems = []
    for name, want in expected.items():  # in the model's order: embeddings first
        if name not in tensors:
            if strict:
                problems.append(f"{name} (missing)")
        elif tuple(tensors[name].shape) != tuple(want.shape):
            problems.append(f"{name} {tuple(tensors[name].shape)} vs recipe {tuple(want.shape)}")
    problems += [f"{name} (not in this model)" for name in tensors if name not in expected]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                           if len(problems) > 6 else "")
        fail(f"{where}: weights do not match the recipe's model: {shown}; use the recipe the "
             "checkpoint was written with")
    check_weights(tensors, where)
    model.load_state_dict(tensors, strict=strict)


FLOAT_DTYPES = ("F32", "BF16", "F16")  # what weights are stored as


def dtype_name(tensor: Any) -> str:
    """A tensor's dtype as safetensors' header names it (F32, BF16, I64, U8, ...)."""
    import torch

    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    return names.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.").upper())


def check_float_tensor(name: str, tensor: Any, where: str) -> None:
    """Refuse a weight that is not stored as floats: loading would cast it silently, reading
    float bits as integers (a norm's 1.0 becomes 1065353216)."""
    kind = dtype_name(tensor)
    if kind not in FLOAT_DTYPES:
        fail(f"{where}: tensor {name} is {kind}; expected a floating-point dtype "
             f"({'/'.join(FLOAT_DTYPES)}); the file was altered or does not hold weights")


def check_weights(tensors: dict[str, Any], where: str) -> None:
    """Every weight a float, every value finite: what each loader of weights checks."""
    import torch

    for name, tensor in tensors.items():
        check_float_tensor(name, tensor, where)
        if not bool(torch.isfinite(tensor).all()):
            fail(f"{where}: weight {name} contains NaN or Inf values, so the model cannot "
                 "compute anything; use an earlier checkpoint of the run")


def tied_names(model: Any) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tie_embeddings: tok_emb and lm_head)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def unwrap(model: Any) -> Any:
    """The plain GPT under DDP, torch.compile and loss wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# Writing


def _metadata(recipe: Recipe, meta: dict[str, Any], kind: str = FORMAT) -> dict[str, str]:
    out = {"format": kind}
    if kind == FORMAT:
        out["recipe"] = json.dumps({"name": recipe.name, **recipe.to_dict()})
    out.update({key: json.dumps(value) for key, value in meta.items()})
    return out


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Where a safetensors writer puts `path`: atomically, and a full disk is named after
    `path` (safetensors' error names no file; the staging file's name means nothing)."""
    from llmcli.console import writing
    from llmcli.files import atomic_path_in_private_dir

    with writing(path), atomic_path_in_private_dir(path) as tmp:
        yield tmp


def save_model(path: Path, model: Any, recipe: Recipe, **meta: Any) -> None:
    """Write weights and metadata atomically; values of `meta` are stored as JSON."""
    from safetensors.torch import save_model as st_save_model

    with _staged(path) as tmp:
        st_save_model(unwrap(model), str(tmp), metadata=_metadata(recipe, meta))


def save_adapter(path: Path, model: Any, recipe: Recipe, **meta: Any) -> None:
    """Write a model's LoRA tensors and metadata atomically (meta holds "lora" and "base")."""
    from safetensors.torch import save_file

    from llmcli.model.lora import lora_state_dict

    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unwrap(model)).items()}
    with _staged(path) as tmp:
        save_file(tensors, str(tmp), metadata=_metadata(recipe, meta))


# ---------------------------------------------------------------------------------------------
# Trainer state (for --resume): optimizer tensors, RNG and sampler state, next to the weights


def save_trainer_state(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Tensors in safetensors, the small non-tensor parts as JSON metadata; atomic."""
    from safetensors.torch import save_file

    metadata = {"format": TRAINER_FORMAT}
    metadata.update({key: json.dumps(value) for key, value in meta.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _staged(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata) of a trainer state, every field and tensor checked (see
    `trainer_state_problem`); a missing, foreign or altered file is a one-line error."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        fail(f"{path}: trainer state not found, so this checkpoint cannot be resumed exactly; "
             "resume from a step-*.safetensors that has a .trainer.safetensors beside it")
    check_readable(path)
    try:
        with safe_open(utf8_path(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        fail(f"{path}: not a readable trainer state ({first_line(exc)}); was it fully written?")
    if raw.get("format") != TRAINER_FORMAT:
        fail(f"{path}: not an llm trainer state (no '{TRAINER_FORMAT}' metadata)")
    meta = _trainer_meta(raw)
    if isinstance(meta, str):
        fail(f"{path}: trainer state {meta}; the file was altered")
    layout = {k: (dtype_name(v), tuple(v.shape)) for k, v in tensors.items()}
    problem = trainer_state_problem(meta, layout) or _trainer_values_problem(tensors.items())
    if problem is not None:
        fail(f"{path}: trainer state {problem}; the file was altered or damaged: resume from "
             "another checkpoint of the run (--resume auto takes the newest intact one)")
    return tensors, meta


def _trainer_meta(raw: dict[str, str]) -> dict[str, Any] | str:
    """A trainer state's metadata JSON-decoded, or what is wrong with it."""
    meta = {}
    for key, value in raw.items():
        if key == "format":
            continue
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return f"field '{key}' is not JSON"
    return meta


# ---------------------------------------------------------------------------------------------
# Checking a trainer state: every field and tensor, before anything uses one. The header-level
# part (metadata, tensor names, dtypes, shapes) is what `resume_damage` checks too, so that
# --resume auto passes over an altered state; values are checked when the tensors are read.

OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's state per parameter
OPTIM_RE = re.compile(r"^optim\.(\d+)\.(\w+)$")
RANK_RE = re.compile(r"^rank(\d+)\.(.+)$")
SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
MT_WORDS = 624  # the Mersenne Twister state of numpy and Python


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trainer_state_problem(meta: dict[str, Any],
                          layout: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """What is wrong with a trainer state's metadata and tensors (`layout`: name -> (dtype,
    shape)), said as "field 'X' ..." or "tensor X ...", or None. The model is not known here:
    `llmcli.train.state` checks the optimizer's tensors against its parameters."""
    for check in (_counters_problem, _optimizer_meta_problem):
        problem = check(meta)
        if problem is not None:
            return problem
    return _tensors_problem(meta, layout)


def _counters_problem(meta: dict[str, Any]) -> str | None:
    step = meta.get("step")
    if not _is_int(step) or step < 0:
        return "field 'step' is missing or not a count"
    for key in ("total_steps", "tokens"):
        if key in meta and not (_is_int(meta[key]) and meta[key] >= 0):
            return f"field '{key}' is {str(meta[key])[:20]!r}, not a count"
    elapsed = meta.get("elapsed", 0.0)
    if not (_is_number(elapsed) and 0 <= elapsed < float("inf")):
        return f"field 'elapsed' is {str(elapsed)[:20]!r}, not a number of seconds"
    world = meta.get("world_size", 1)
    if not (_is_int(world) and world >= 1):
        return f"field 'world_size' is {str(world)[:20]!r}, not a process count (1 or more)"
    for key in ("best_val", "val_loss", "train_loss"):
        if meta.get(key) is not None and not _is_number(meta[key]):
            return f"field '{key}' is {str(meta[key])[:20]!r}, not a loss"
    best = meta.get("best_step")
    if best is not None and not (_is_int(best) and 0 <= best <= step):
        return f"field 'best_step' is {str(best)[:20]!r}, not a step up to {step}"
    evals = meta.get("evals", [])
    if not isinstance(evals, list) or not all(
            isinstance(e, dict) and _is_int(e.get("step")) and 0 <= e["step"] <= step
            and _is_number(e.get("train")) and _is_number(e.get("val")) for e in evals):
        return f"field 'evals' is not a list of {{step, train, val}} up to step {step}"
    scaler = meta.get("scaler")
    if scaler and not (isinstance(scaler, dict) and all(
            _is_number(scaler.get(k)) and scaler[k] >= 0 for k in SCALER_KEYS)):
        return f"field 'scaler' is not a gradient scaler's state ({', '.join(SCALER_KEYS)})"
    if "save_id" in meta and not isinstance(meta["save_id"], str):
        return "field 'save_id' is not a string"
    return None


def _optimizer_meta_problem(meta: dict[str, Any]) -> str | None:
    optimizer = meta.get("optimizer")
    if not isinstance(optimizer, dict):
        return "field 'optimizer' is missing or not a mapping"
    groups = optimizer.get("param_groups")
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "field 'optimizer' has no list of parameter groups"
    indices = [i for g in groups for i in g["params"]]
    if indices != list(range(len(indices))):
        return "field 'optimizer' numbers its parameters out of order"
    scalars = optimizer.get("scalars", {})
    if not isinstance(scalars, dict) or not all(
            k.isdigit() and int(k) < len(indices) and isinstance(v, dict)
            and all(_is_number(x) or x is None for x in v.values())
            for k, v in scalars.items()):
        return "field 'optimizer' has scalars that are not numbers of its parameters"
    return None


def _tensors_problem(meta: dict[str, Any],
                     layout: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """Every tensor has a place, a dtype and a shape it can have."""
    params = sum(len(g["params"]) for g in meta["optimizer"]["param_groups"])
    optim: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    ranks: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, (dtype, shape) in layout.items():
        found = OPTIM_RE.match(name)
        ranked = RANK_RE.match(name)
        if found and int(found.group(1)) < params and found.group(2) in OPTIM_KEYS:
            optim.setdefault(int(found.group(1)), {})[found.group(2)] = (dtype, shape)
        elif ranked:
            ranks.setdefault(int(ranked.group(1)), {})[ranked.group(2)] = (dtype, shape)
        elif not name.startswith("param."):
            return f"tensor {name} has no place in it"
        if (found or name.startswith("param.")) and dtype not in FLOAT_DTYPES:
            return f"tensor {name} is {dtype}; expected a floating-point dtype"
    for index, values in sorted(optim.items()):
        problem = _moments_problem(index, values, meta["optimizer"].get("scalars", {}))
        if problem is not None:
            return problem
    return _rng_problem(meta, ranks)


def _moments_problem(index: int, values: dict[str, tuple[str, tuple[int, ...]]],
                     scalars: dict[str, Any]) -> str | None:
    """AdamW's state of one parameter: a step count and two moments of one shape."""
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in values:
            return f"tensor optim.{index}.{key} is missing (parameter {index} has " \
                   f"{', '.join(sorted(values))})"
    if "step" not in values and "step" not in scalars.get(str(index), {}):
        return f"tensor optim.{index}.step is missing"
    if "step" in values and values["step"][1] not in ((), (1,)):
        return f"tensor optim.{index}.step has shape {values['step'][1]}, not a single count"
    shape = values["exp_avg"][1]
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        if key in values and values[key][1] != shape:
            return (f"tensor optim.{index}.{key} has shape {values[key][1]}, but "
                    f"optim.{index}.exp_avg has {shape}")
    return None


def _rng_problem(meta: dict[str, Any],
                 ranks: dict[int, dict[str, tuple[str, tuple[int, ...]]]]) -> str | None:
    """One set of random states per process that saved: torch's, numpy's, Python's."""
    import torch

    rng = meta.get("rng")
    world = meta.get("world_size", max(len(ranks), 1))
    if not isinstance(rng, dict) or set(rng) != {str(r) for r in range(world)}:
        return f"field 'rng' does not hold one entry per process (0 to {world - 1})"
    if sorted(ranks) != list(range(world)):
        return f"its tensors do not hold the random states of processes 0 to {world - 1}"
    generator = torch.Generator().get_state().numel()
    for rank in range(world):
        entry = rng[str(rank)]
        numpy_state = entry.get("numpy") if isinstance(entry, dict) else None
        python_state = entry.get("python") if isinstance(entry, dict) else None
        if not (isinstance(numpy_state, list) and len(numpy_state) == 4
                and isinstance(numpy_state[0], str) and _is_int(numpy_state[1])
                and 0 <= numpy_state[1] <= MT_WORDS and numpy_state[2] in (0, 1)
                and _is_number(numpy_state[3])
                and isinstance(python_state, list) and len(python_state) == 2
                and _is_int(python_state[0])
                and (python_state[1] is None or _is_number(python_state[1]))):
            return f"field 'rng' entry '{rank}' is not the numpy and Python states it saves"
        want = {"rng.torch": ("U8", (generator,)), "rng.numpy": ("I64", (MT_WORDS,)),
                "rng.python": ("I64", (MT_WORDS + 1,))}
        held = ranks[rank]
        for key, (_, shape) in held.items():
            if key.startswith("batches.") and ".rng." in f".{key}":
                want.setdefault(key, ("U8", (generator,)))
            elif key.startswith("rng.cuda."):
                want.setdefault(key, ("U8", shape))
        for key, (dtype, shape) in want.items():
            name = f"rank{rank}.{key}"
            if key not in held:
                return f"tensor {name} is missing"
            if held[key] != (dtype, shape):
                return (f"tensor {name} is {held[key][0]} {list(held[key][1])}, not the "
                        f"{dtype} {list(shape)} of a random state")
    return None


def _trainer_values_problem(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """Values no training writes: moments that are not finite or a negative second moment
    (the loss would turn NaN and be blamed on the learning rate), random states out of range.
    `tensors`: (name, tensor) pairs, read one at a time if need be."""
    import torch

    for name, tensor in tensors:
        if name.startswith(("optim.", "param.")) and not bool(torch.isfinite(tensor).all()):
            return f"tensor {name} holds NaN or Inf values"
        if name.endswith(("exp_avg_sq", ".step")) and bool((tensor < 0).any()):
            return f"tensor {name} holds negative values"
        if name.endswith((".rng.numpy", ".rng.python")) and len(tensor) and not (
                int(tensor.min()) >= 0 and int(tensor.max()) < 2**32):
            return f"tensor {name} holds values beyond 32 bits"
    return None


def resume_damage(path: Path) -> str | None:
    """Why a step checkpoint cannot be resumed from (weights or trainer state), or None."""
    problem = damage(path)
    if problem is not None:
        return f"{path.name}: {problem}"
    state = trainer_path(path)
    if not state.exists():
        return f"{state.name} is missing"
    check_readable(state)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(state), framework="pt") as fh:
            raw = fh.metadata() or {}
            layout = {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape()))
                      for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        return f"{state.name}: {first_line(exc)}"
    if raw.get("format") != TRAINER_FORMAT:
        return f"{state.name}: not an llm trainer state"
    if _data_end(state) > state.stat().st_size:
        return f"{state.name}: truncated"
    meta = _trainer_meta(raw)
    problem = meta if isinstance(meta, str) else trainer_state_problem(meta, layout)
    if problem is None:
        with safe_open(str(state), framework="pt") as fh:  # one tensor at a time: flat memory
            problem = _trainer_values_problem((k, fh.get_tensor(k)) for k in layout)
    if problem is not None:
        return f"{state.name}: {problem}"
    return _pair_problem(path, state)


def _pair_problem(path: Path, state: Path) -> str | None:
    """Why a step file and the trainer state beside it were not saved together, or None: a
    file copied or merged over the weights would otherwise resume with another run's state."""
    weights, trainer = raw_metadata(path), raw_metadata(state)
    for key in ("save_id", "step"):
        mine, theirs = weights.get(key), trainer.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            return (f"{path.name} and {state.name} were not saved together ({key} "
                    f"{first_line(mine)[:32]} vs {first_line(theirs)[:32]}): the weights were "
                    "replaced after the run wrote them")
    return None


def resolve_resume(spec: str | Path | bool | None, run_dir: Path) -> Path | None:
    """The step checkpoint to resume from.

    `True`/"latest": the newest in `run_dir`, which must be intact (a damaged one is named and
    the newest good one offered); "auto": the newest intact one, skipping damaged files with a
    warning; a directory: its newest; a file: that one.
    """
    if spec in (None, False):
        return None
    auto = spec == "auto"
    where = Path(run_dir) if spec in (True, "latest", "auto") else Path(spec)
    if where.is_dir() or spec in (True, "latest", "auto"):
        found = [p for _, p in reversed(step_checkpoints(where))] if where.is_dir() else []
        if not found:
            left = run_files(where)
            if left:  # a run killed before its first checkpoint: a fresh start must replace it
                # metrics and a plot alone are replaced by a plain start (prepare_run_dir)
                how = ("start again without --resume (it replaces them)"
                       if all(p.name in RUN_FILES for p in left) else
                       "start again with --overwrite instead of --resume")
                fail(f"--resume: {where} holds an earlier run that stopped before its first "
                     f"step checkpoint ({len(left)} files, e.g. {left[0].name}), so there is "
                     f"nothing to resume; {how}")
            fail(f"--resume: no resumable checkpoint in {where}; start without --resume or give "
                 "a step-*.safetensors file")
        for path in found:
            problem = resume_damage(path)
            if problem is None:
                if path != found[0]:
                    warn(f"--resume auto: skipped {found.index(path)} damaged newer "
                         f"checkpoint(s); resuming from {path}")
                return path
            if not auto:
                good = next((p for p in found[1:] if resume_damage(p) is None), None)
                offer = (f"the newest good one is {good}: rerun with --resume auto to take it" if
                         good else "no older checkpoint there is intact either")
                fail(f"--resume: {path} cannot be resumed ({problem}); {offer}")
        fail(f"--resume auto: none of the {len(found)} checkpoints in {where} is intact; "
             "start again with --overwrite")
    if not where.exists():
        fail(f"--resume {where}: not found; give a run directory or a step-*.safetensors file")
    if where.suffix != ".safetensors" or where.name.endswith(".trainer.safetensors"):
        fail(f"--resume {where}: expected a step-*.safetensors checkpoint or a run directory")
    problem = resume_damage(where)
    if problem is not None:
        fail(f"--resume {where}: cannot be resumed ({problem}); use another checkpoint of the run")
    return where
