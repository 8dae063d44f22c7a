"""Property-based fuzzing of every command's arguments (issue 10 §3).

Whatever the arguments, a command exits 0, 1 or 2; a failure is one `error:` line on stderr
(or click's own usage error), never a traceback, never a `*.part` or `.*.tmp` file left behind.
The same generators drive `benchmarks/fuzz_cli.py`, which runs 10,000+ cases with a per-case
timeout; this file is the fast slice that runs with the test suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmcli.cli import app

COMMANDS = ("fetch", "tokenize", "pretrain", "finetune", "params", "generate", "imagine",
            "scaling")

# ---------------------------------------------------------------------------------------------
# The fixture workspace: inputs of every kind, built once; each case runs in a fresh directory.

_ROOT: list[Path] = []  # the workspace, set by build_workspace (strategies read it lazily)
LONG_NAME = "n" * 300  # ENAMETOOLONG


def fix(name: str) -> str:
    """The absolute path of fixture `name` (resolved when drawn, after the workspace exists)."""
    return str(_ROOT[0] / "fix" / name)


def _records(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i} said."} for i in range(n)]


def build_workspace(root: Path) -> Path:
    """Fixtures under root/fix: texts, records, recipes, checkpoints and awkward paths."""
    import torch

    from llmcli.checkpoint import save_model
    from llmcli.model.gpt import build_model
    from llmcli.recipe import ModelConfig, Recipe

    root.mkdir(parents=True, exist_ok=True)
    _ROOT[:] = [root.resolve()]
    f = root / "fix"
    f.mkdir(exist_ok=True)
    text = "The quick brown fox jumps over the lazy dog.\nIt was the best of times.\n" * 20
    (f / "text.txt").write_text(text, encoding="utf-8")
    (f / "empty.txt").write_bytes(b"")
    (f / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (f / "latin1.txt").write_bytes("café naïve\n".encode("latin-1"))
    (f / "spaces.txt").write_text("x" + " " * 1_000_000 + "y\n", encoding="utf-8")
    (f / "newlines.txt").write_text("\n" * 200_000, encoding="utf-8")
    (f / "br[ack]et.txt").write_text("bracket [/x] text\n", encoding="utf-8")
    (f / "ünï cödé.txt").write_text("unicode ünï\n", encoding="utf-8")
    (f / "records.json").write_text(json.dumps(_records(40)), encoding="utf-8")
    (f / "records.jsonl").write_text("\n".join(json.dumps(r) for r in _records(20)) + "\n",
                                     encoding="utf-8")
    (f / "bad.json").write_text('{"instruction": [1, 2', encoding="utf-8")
    (f / "bad.yaml").write_text("model: [unclosed\n  - : :\n", encoding="utf-8")
    (f / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    (f / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (f / "dir").mkdir(exist_ok=True)
    (f / "dir" / "a.txt").write_text(text, encoding="utf-8")
    (f / "emptydir").mkdir(exist_ok=True)
    (f / "x.tokens").mkdir(exist_ok=True)
    (f / "nosidecar.tokens").write_bytes(b"\x01\x00\x00\x00" * 8)
    for name, target in (("loop", "loop"), ("dangling", "missing-target")):
        if not (f / name).is_symlink():
            (f / name).symlink_to(target)

    model_cfg = ModelConfig(vocab_size=257, context_length=16, d_model=16, num_blocks=1,
                            num_heads=2, dropout=0.0, init_std=0.3)
    recipe = Recipe(name="tiny")
    recipe.model = model_cfg
    recipe.data.tokenizer = "bytes"
    torch.manual_seed(0)
    save_model(f / "run" / "step-00000000.safetensors", build_model(model_cfg), recipe, step=0,
               tokenizer="bytes")
    shutil.copy(f / "run" / "step-00000000.safetensors", f / "ckpt.safetensors")
    big = dataclasses.replace(model_cfg, vocab_size=100_277, d_model=8, num_heads=1)
    recipe_cl = Recipe(name="tiny-cl")
    recipe_cl.model = big
    save_model(f / "cl100k.safetensors", build_model(big), recipe_cl, step=0,
               tokenizer="cl100k_base")

    model_yaml = ("model: {vocab_size: 257, context_length: 16, d_model: 16, num_blocks: 1, "
                  "num_heads: 2, dropout: 0.0}\n")
    train_yaml = ("train: {batch_size: 2, max_iters: 2, eval_interval: 1, eval_iters: 1, "
                  "log_interval: 1, checkpoint_interval: 2}\n")
    (f / "pre.yaml").write_text(
        f"name: pre\ndata: {{source: {json.dumps(fix('text.txt'))}, tokenizer: bytes}}\n"
        + model_yaml + train_yaml, encoding="utf-8")
    for name, rank in (("ft", 0), ("lora", 2)):
        (f / f"{name}.yaml").write_text(
            f"name: {name}\ndata: {{source: {json.dumps(fix('records.json'))}, "
            "tokenizer: bytes}\n"
            f"finetune: {{init: {json.dumps(fix('run'))}, template: '{{instruction}}: '}}\n"
            f"lora: {{rank: {rank}}}\n"
            + model_yaml + train_yaml, encoding="utf-8")
    for command, run in (("pretrain", "pre"), ("finetune", "lora")):  # runs to resume, merge
        if not (f / f"{run}-run").is_dir():
            result = _invoke_in(root, ["--quiet", command, fix(f"{run}.yaml"), "-o",
                                       fix(f"{run}-run")])
            assert result.exit_code == 0, result.output
    return root


def _invoke_in(directory: Path, argv: list[str], stdin: bytes | None = None) -> Any:
    """CliRunner.invoke with `directory` as the working directory (outputs and caches land
    there), restored afterwards."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        return _runner.invoke(app, argv, input=stdin)
    finally:
        os.chdir(before)


def prepare_case_dir(path: Path) -> None:
    """A fresh working directory holding outputs' awkward neighbours."""
    path.mkdir(parents=True)
    (path / "afile").write_text("hello\n", encoding="utf-8")
    (path / "adir").mkdir()
    (path / "adir" / "a.txt").write_text("hello there\n", encoding="utf-8")
    (path / "x.tokens").mkdir()
    (path / "loop").symlink_to("loop")
    (path / "dangling").symlink_to("nowhere/x")
    (path / "y.tokens").mkdir()  # where `-o y` puts the token file
    (path / "z.tokens.json").mkdir()  # where `-o z` puts the sidecar
    (path / "afile.png").write_text("not a png\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Value generators


def _lazy(names: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(names).map(fix)


ARG_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=30),
    st.sampled_from(["[/x]", "[bold]hi[/bold]", "a\nb", "\r\n", " ", "-", "--", "<|endoftext|>",
                     "\udcff\udcfe", "中文 テキスト", "x" * 5000, " " * 20_000 + "x", "'s" * 50,
                     "\u2028\u00a0\u3000", "e\u0301" * 10]),
)
INT = st.one_of(
    st.integers(-2, 12).map(str),
    st.sampled_from(["0", "-1", "99999999999", "99999999999999999999999", str(2**63),
                     str(2**63 - 1), "-99999999999", "1e3", "nan", "inf", "abc", "", "0x10",
                     "1_000", "٣", "3.5", "256", "257", "4097", "65536", "-0", "+5", " 5 ",
                     "10" * 200]),
)
FLOAT = st.one_of(
    st.floats(-3, 3, allow_nan=False).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e-39", "1e-5", "1e308", "1e309", "-1000",
                     "0", "-0", "0.01", "0.5", "1", "100", "101", "abc", "", "1,5", "NaN",
                     "1e400", "5e-324", "-1e-300", "0.999999", "1.0000001", "10", "-10.5",
                     "0x1p3", "1_0.5"]),
)
NUMBER_TEXT = st.one_of(  # scaling's human numbers
    INT, FLOAT,
    st.sampled_from(["140M", "1.4e8", "7B", "1.5T", "e5", "1e", "12k", "1,000,000", "M", "-5M",
                     "0M", "1e31", "40%", "101%", "nan%", "١٢٣", "1..2", ".5", "5.", "1_000k"]),
)
FLAG = st.just(None)
INPUT_PATH = st.one_of(
    _lazy(["text.txt", "empty.txt", "binary.bin", "latin1.txt", "spaces.txt", "newlines.txt",
           "br[ack]et.txt", "ünï cödé.txt", "records.json", "records.jsonl", "bad.json",
           "bad.yaml", "list.yaml", "garbage.safetensors", "dir", "emptydir", "x.tokens",
           "nosidecar.tokens", "loop", "dangling", "missing.txt", "text.txt/sub", LONG_NAME,
           "pre.yaml", "ckpt.safetensors", "run"]),
    st.sampled_from(["afile", "adir", "x.tokens", "loop", "", ".", "missing", LONG_NAME,
                     "afile/x", "[x]", "/proc/self/mem", "/nonexistent/dir/x"]),
)
OUTPUT_PATH = st.sampled_from([
    "out", "out.tokens", "o/x.png", "o/x", "afile", "afile/sub", "adir", "x.tokens", "loop",
    LONG_NAME, "o/" + LONG_NAME, "[x]/y", "ü/ö.png", "", ".", "a.png", "/proc/nope/x",
    "run", "out.txt", "y", "z", "adir/", "loop/x", "afile.png", "x.tokens/x", "o.svg", "o.pdf",
    "o.jpg", "adir/a.txt", "-", "~/x", "dangling",
])
RECIPE_PATH = st.one_of(_lazy(["pre.yaml", "ft.yaml", "lora.yaml", "bad.yaml", "list.yaml",
                               "text.txt", "binary.bin", "empty.txt", "dir", "loop",
                               "missing.yaml", "ckpt.safetensors", "run", LONG_NAME + ".yaml"]),
                        INPUT_PATH)
# An empty recipe (or only newlines) is every default: the tutorial's 140M-parameter model,
# days of valid training.
TRAIN_RECIPE = RECIPE_PATH.filter(lambda path: not path.endswith(("empty.txt", "newlines.txt")))
CHECKPOINT = st.one_of(_lazy(["run", "ckpt.safetensors", "cl100k.safetensors", "pre-run",
                              "lora-run", "lora-run/best.safetensors",
                              "garbage.safetensors", "text.txt", "emptydir", "loop",
                              "missing.safetensors", "dir"]),
                       st.sampled_from(["tiny", "nope", "adir", "afile", "x.safetensors"]))
DEVICE = st.sampled_from(["auto", "cpu", "cuda", "cuda:7", "mps", "tpu", "", "cpu:0", "meta",
                          "CPU", "cuda:99999999999999999999", "cuda:-1", "cpu:-1", "mps:0",
                          "cuda:0:1", "xla", "cpu,cuda"])
KEYS = ["data.source", "data.tokenizer", "data.val_fraction", "data.vocab", "data.records",
        "model.vocab_size", "model.context_length", "model.d_model", "model.num_heads",
        "model.num_blocks", "model.dropout", "model.positions", "model.norm_eps",
        "train.max_iters", "train.batch_size", "train.lr", "train.seed", "train.max_time",
        "train.eval_iters", "train.precision", "finetune.init", "finetune.template",
        "lora.rank", "lora.alpha", "generate.temperature", "nope.key", "model", "train.nope"]
OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.one_of(INT, FLOAT, ARG_TEXT, INPUT_PATH)).map("=".join),
    st.sampled_from(["train.max_iters=1", "model.dropout=0", "train.max_iters=1e30",
                     "model.d_model=nan", "=", "a=b", "train.max_iters=", "x", "..=1",
                     "model.context_length=99999999999", "train.seed=-1",
                     "data.source=builtin", "data.tokenizer=cl100k_base", "data.vocab=compact",
                     "model.vocab_size=auto", "model.positions=rope", "train.compile=maybe",
                     "train.precision=fp16", "train.tracker=tensorboard", "lora.targets=x,y",
                     "finetune.template={instruction}", "finetune.template={nope}",
                     "data.records=1:2", "data.records=5:1", "data.records=x"]),
)


# (Valid but slow by nature is left out: train.compile=true spends a minute in the compiler.)
# Each command: positional generators (in order, each may be left out from the end) and options.
Spec = tuple[list[st.SearchStrategy[str]], dict[str, st.SearchStrategy[Any]]]
SPECS: dict[str, Spec] = {
    "fetch": ([st.one_of(st.sampled_from(["builtin", "sales-textbook", "nope", "hf://datasets/x",
                                          "hf://", "http://127.0.0.1:9/x.txt", "ftp://x/y",
                                          "file:///etc/passwd"]), INPUT_PATH)],
              {"-o": OUTPUT_PATH, "--sha256": st.sampled_from(["0" * 64, "xyz", "", "A" * 64]),
               "--force": FLAG, "--list": FLAG,
               "--retries": st.sampled_from(["0", "1", "-1", "101", "99999999999", "x", "nan"])}),
    "tokenize": ([INPUT_PATH, INPUT_PATH],
                 {"-o": OUTPUT_PATH, "--tokenizer": st.sampled_from(["cl100k_base", "bytes",
                                                                     "gpt2", ""]),
                  "--val-fraction": FLOAT, "--errors": st.sampled_from(["strict", "replace", "x"]),
                  "--context-length": INT, "--show": ARG_TEXT, "--head": INT, "--json": FLAG}),
    "pretrain": ([TRAIN_RECIPE, OVERRIDE, st.one_of(OVERRIDE, CHECKPOINT)],
                 {"-o": OUTPUT_PATH, "--resume": FLAG, "--overwrite": FLAG, "--device": DEVICE,
                  "--nproc": st.sampled_from(["0", "-1", "99999999999", "abc", "1"]),
                  "--dry-run": FLAG, "--keys": FLAG, "--json": FLAG}),
    "finetune": ([st.one_of(TRAIN_RECIPE, CHECKPOINT), OVERRIDE, st.one_of(OVERRIDE, CHECKPOINT)],
                 {"-o": OUTPUT_PATH, "--resume": FLAG, "--overwrite": FLAG, "--merge": FLAG,
                  "--strict": FLAG, "--device": DEVICE,
                  "--nproc": st.sampled_from(["0", "-1", "99999999999", "abc", "1"])}),
    "params": ([st.one_of(RECIPE_PATH, CHECKPOINT), OVERRIDE], {"--json": FLAG}),
    "generate": ([CHECKPOINT, ARG_TEXT],
                 {"--prompt-file": INPUT_PATH, "--batch": FLAG, "--instruct": ARG_TEXT,
                  "--input": ARG_TEXT,
                  "--strategy": st.sampled_from(["greedy", "sample", "beam", "", "Beam", "x"]),
                  "--max-new-tokens": INT, "--temperature": FLOAT, "--top-k": INT,
                  "--top-p": FLOAT, "--min-p": FLOAT, "--repetition-penalty": FLOAT,
                  "--num-beams": INT, "--length-penalty": FLOAT, "--no-repeat-ngram-size": INT,
                  "--num-return-sequences": INT, "--stop": ARG_TEXT,
                  "--seed": st.one_of(INT, st.just(str(2**64))),
                  "--compare": st.sampled_from(["greedy,beam,sample", "beam", ",", "x", "",
                                                "sample,sample"]),
                  "--show-probs": FLAG, "--json": FLAG, "--device": DEVICE,
                  "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "int8", ""]),
                  "--no-cache": FLAG}),
    "imagine": ([ARG_TEXT],
                {"-o": OUTPUT_PATH, "--model": st.one_of(INPUT_PATH, st.just("nope/model")),
                 "--steps": INT, "--guidance": FLOAT, "--width": INT, "--height": INT,
                 "--seed": INT, "--negative": ARG_TEXT, "--num-images": INT, "--device": DEVICE,
                 "--dtype": st.sampled_from(["auto", "fp32", "fp16", "bf16", "x"]),
                 "--json": FLAG}),
    "scaling": ([OVERRIDE],
                {"--params": NUMBER_TEXT, "--tokens": NUMBER_TEXT, "--flops": NUMBER_TEXT,
                 "--recipe": RECIPE_PATH, "--fit": st.sampled_from(["chinchilla", "epoch", "x"]),
                 "--gpu": st.sampled_from(["h100", "a100", "H100", "x", ""]),
                 "--num-gpus": NUMBER_TEXT, "--mfu": NUMBER_TEXT,
                 "--tokens-per-second": NUMBER_TEXT, "--plot": OUTPUT_PATH, "--json": FLAG,
                 "--list-gpus": FLAG}),
}


STDIN = st.one_of(st.none(), ARG_TEXT.map(lambda t: t.encode("utf-8", "surrogateescape")),
                  st.sampled_from([b"\xff\xfe garbage", b"", b"line\n" * 20,
                                   b" " * 1_000_000 + b"x", b"\x00\x01\x02"]))


# Values no numeric option accepts: a case holding one must not exit 0. (Huge integers are
# fine for scaling's counts, so they count only for the INT and FLOAT options.)
NEVER_VALID = {"nan", "-nan", "NaN", "inf", "-inf", "abc", "", "1e309", "1e400"}
NEVER_VALID_NUMBER = NEVER_VALID | {"99999999999999999999999", str(2**63), str(2**64),
                                    "-99999999999", "10" * 200}


@dataclasses.dataclass
class Case:
    argv: list[str]
    stdin: bytes | None = None
    must_fail: bool = False  # a numeric option got a value that none accepts


@st.composite
def command_case(draw: st.DrawFn, command: str) -> Case:
    """One invocation of `command`: some positionals, some options, maybe piped stdin."""
    positionals, options = SPECS[command]
    argv = [command]
    for gen in positionals[:draw(st.integers(0, len(positionals)))]:
        argv.append(draw(gen))
    must_fail = False
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        value = draw(options[name])
        argv += [name] if value is None else [name, value]
        bad = NEVER_VALID if options[name] is NUMBER_TEXT else NEVER_VALID_NUMBER
        must_fail |= any(options[name] is kind for kind in (INT, FLOAT, NUMBER_TEXT)) and (
            value in bad)
    if command == "fetch" and "--retries" not in argv:
        argv += ["--retries", "0"]  # offline, the default 5 retries back off for 30 s by design
    stdin = draw(STDIN) if command == "generate" else None
    prefix = draw(st.sampled_from([[], [], ["--quiet"]]))
    return Case(prefix + argv, stdin, must_fail)


CASES = st.sampled_from(COMMANDS).flatmap(command_case)

# ---------------------------------------------------------------------------------------------
# Running one case and judging it


@dataclasses.dataclass
class Outcome:
    argv: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None  # the last line of an escaped exception's traceback
    seconds: float
    leftovers: list[str]


_runner = CliRunner()
_STRAY = ("*.part", ".*.tmp")


def leftovers(*dirs: Path) -> list[str]:
    """Temporary or partial files under dirs: what an interrupted or failed write leaves."""
    found: list[str] = []
    for d in dirs:
        for pattern in _STRAY:
            found += [str(p) for p in d.rglob(pattern)]
    return found


def run_case(case: Case, case_dir: Path) -> Outcome:
    """Invoke the CLI in-process in case_dir; restores the working directory afterwards."""
    prepare_case_dir(case_dir)
    started = time.perf_counter()
    result = _invoke_in(case_dir, case.argv, case.stdin)
    seconds = time.perf_counter() - started
    error = None
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        lines = traceback.format_exception(*result.exc_info) if result.exc_info else [repr(exc)]
        error = lines[-1].strip()
    return Outcome(case.argv, result.exit_code, result.stdout, result.stderr, error, seconds,
                   leftovers(case_dir))  # the shared fixtures are checked by the caller


def problems(o: Outcome, case: Case | None = None) -> list[str]:
    """What is wrong with an outcome: tracebacks, stray files, an error not on one line, or
    success with a value no option accepts."""
    found = []
    if case is not None and case.must_fail and o.exit_code == 0:
        found.append("exit 0 with an invalid number")
    if o.error is not None:
        found.append(f"traceback: {o.error}")
    if "Traceback (most recent call last)" in o.stdout + o.stderr:
        found.append("traceback text in the output")
    if "rerun with --debug" in o.stderr:
        found.append("unexpected error: " + o.stderr.strip().splitlines()[-1])
    if o.exit_code not in (0, 1, 2):
        found.append(f"exit code {o.exit_code}")
    elif o.exit_code and o.error is None and not is_usage_error(o):
        lines = o.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            found.append("not one error line: " + repr(o.stderr[-300:]))
    if o.leftovers:
        found.append(f"left behind: {', '.join(o.leftovers[:3])}")
    return found


def is_usage_error(o: Outcome) -> bool:
    """Click's own parse errors (a bad integer, an unknown option): exit 2 with its usage box."""
    return o.exit_code == 2 and o.stderr.startswith("Usage:")


# ---------------------------------------------------------------------------------------------
# The fast slice


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("fuzz"))


_counter = iter(range(10**9))
FAST = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


def _check(workspace: Path, case: Case) -> None:
    outcome = run_case(case, workspace / "cases" / str(next(_counter)))
    outcome.leftovers += leftovers(workspace / "fix")
    assert not problems(outcome, case), (case, problems(outcome, case), outcome.stderr[-2000:])


def _make_test(command: str) -> Callable[[Path], None]:
    @FAST
    @given(case=command_case(command))
    def test(workspace: Path, case: Case) -> None:
        _check(workspace, case)

    test.__name__ = f"test_fuzz_{command}"
    return test


for _command in COMMANDS:
    globals()[f"test_fuzz_{_command}"] = _make_test(_command)


@pytest.mark.parametrize("argv", [
    ["tokenize", "--show", " " * 100_000 + "x"],
    ["tokenize", "--head", "99999999999", "{text}"],
    ["tokenize", "{text}", "-o", "x.tokens"],
    ["tokenize", "{text}", "-o", LONG_NAME],
    ["tokenize", "{text}", "-o", "afile/sub"],
    ["tokenize", "{spaces}", "-o", "sp"],
    ["generate", "{run}", "hi", "--temperature", "1e-39"],
    ["generate", "{run}", "hi", "--length-penalty", "-1000", "-s", "beam"],
    ["generate", "{run}", "hi", "--num-return-sequences", "0"],
    ["generate", "{run}", "hi", "--seed", "99999999999999999999999"],
    ["generate", "{run}", "hi", "--temperature", "nan"],
    ["generate", "{run}", "hi", "--top-p", "nan"],
    ["generate", "{run}", "hi", "--max-new-tokens", "99999999999"],
    ["generate", "{cl100k}", "--prompt-file", "{spaces}", "-n", "1", "-s", "greedy"],
    ["scaling", "--params", "e5"],
    ["scaling", "--plot", "afile/x.png", "--params", "1M"],
])
def test_known_bad_inputs_are_one_line(workspace: Path, argv: list[str]) -> None:
    names = {"text": "text.txt", "spaces": "spaces.txt", "run": "run",
             "cl100k": "cl100k.safetensors"}
    argv = [fix(names[a[1:-1]]) if a.startswith("{") else a for a in argv]
    outcome = run_case(Case(argv), workspace / "cases" / str(next(_counter)))
    assert not problems(outcome), (argv, problems(outcome), outcome.stderr[-2000:])
    assert outcome.exit_code in (0, 2), outcome.stderr


class _Panic(BaseException):
    """Like pyo3's PanicException: a BaseException, not an Exception."""


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(("exc", "code", "words"), [
    (_Panic("called `Result::unwrap()`\non an `Err`"), 1, "_Panic: called"),
    (MemoryError(), 1, "out of memory (MemoryError); use smaller sizes"),
    (IsADirectoryError(21, "Is a directory", "out.tokens"), 2, "out.tokens: is a directory"),
    (OSError(36, "File name too long", "n" * 300), 2, "file name too long"),
    (OSError(5, "Input/output error"), 1, "OSError: [Errno 5]"),
])
def test_run_guarded_turns_any_error_into_one_line(
        exc: BaseException, code: int, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llmcli.console import run_guarded

    with pytest.raises(SystemExit) as stopped:
        run_guarded(lambda: _raise(exc))
    assert stopped.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and words in err


def test_debug_shows_the_panic(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """--debug prints the traceback, and exits with the code the error's kind has (1)."""
    from llmcli import console

    monkeypatch.setitem(console.settings, "debug", True)
    with pytest.raises(SystemExit) as stopped:
        console.run_guarded(lambda: _raise(_Panic("boom")))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("_Panic: boom")
