"""`llm imagine` on tiny Stable Diffusion and SDXL pipelines built from configs (no download).

The pictures are noise, but every path a real sdxl-turbo run takes is exercised: two text
encoders, the VAE, the scheduler, the step callback, PNG metadata, seeding, weight variants,
the Hugging Face cache and the offline error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_imagine import build_tiny_sd, build_tiny_sdxl
from PIL import Image
from typer.testing import CliRunner

from llmcli.cli import app

runner = CliRunner()
TINY_SIDE = ("--width", "40", "--height", "24")


# ---------------------------------------------------------------------------------------------
# Tiny pipelines, built once per session


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy 2-core box threads spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def _imagine(*args: str):
    return runner.invoke(app, ["imagine", "--device", "cpu", *args])


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Drawing with both pipeline shapes


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sdxl"])
def test_png_has_size_metadata_and_same_seed_gives_same_pixels(kind, request, tmp_path):
    model = str(request.getfixturevalue(kind))
    first = _imagine("画一个大海", "--model", model, "--steps", "2", *TINY_SIDE, "--seed", "7",
                     "-n", "2", "-o", str(tmp_path / "sea.png"))
    assert first.exit_code == 0, first.output + first.stderr
    one, two = tmp_path / "sea-1.png", tmp_path / "sea-2.png"
    assert f"{one}  seed 7" in first.stdout and f"{two}  seed 8" in first.stdout
    assert "model load" in first.stdout
    with Image.open(one) as image:
        assert image.format == "PNG" and image.size == (40, 24)
        assert image.text == {
            "prompt": "画一个大海", "negative_prompt": "", "seed": "7", "steps": "2",
            "guidance": "0", "model": model, "size": "40x24",
            "software": image.text["software"]}
    with Image.open(two) as image:
        assert image.text["seed"] == "8"

    again = _imagine("画一个大海", "--model", model, "--steps", "2", *TINY_SIDE, "--seed", "7",
                     "-o", str(tmp_path / "again.png"))
    assert again.exit_code == 0, again.output + again.stderr
    assert _pixels(tmp_path / "again.png") == _pixels(one)  # a fresh load, the same picture
    assert _pixels(two) != _pixels(one)  # seed + 1 is another picture
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_sdxl_json_report(tiny_sdxl, tmp_path):
    result = _imagine("a sea", "--model", str(tiny_sdxl), "--steps", "1", "--width", "32",
                      "--height", "32", "--seed", "3", "-o", f"{tmp_path}/", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["pipeline"] == "StableDiffusionXLPipeline"
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["sdpa"] is True and report["load_seconds"] > 0
    [image] = report["images"]
    assert image["path"] == str(tmp_path / "a-sea-3.png") and image["seed"] == 3
    assert image["seconds"] > 0
    with Image.open(image["path"]) as png:
        assert png.size == (32, 32) and png.text["model"] == str(tiny_sdxl)


def test_negative_prompt_steers_with_guidance(tiny_sd, tmp_path):
    common = ("a sea", "--model", str(tiny_sd), "--steps", "2", *TINY_SIDE, "--seed", "1",
              "--guidance", "7.5")
    plain = _imagine(*common, "-o", str(tmp_path / "plain.png"))
    steered = _imagine(*common, "--negative", "the sea", "-o", str(tmp_path / "neg.png"))
    assert plain.exit_code == 0 and steered.exit_code == 0, plain.stderr + steered.stderr
    assert _pixels(tmp_path / "plain.png") != _pixels(tmp_path / "neg.png")
    with Image.open(tmp_path / "neg.png") as image:
        assert image.text["negative_prompt"] == "the sea" and image.text["guidance"] == "7.5"
    quiet = _imagine(*common[:-1], "0", "--negative", "x", "-o", str(tmp_path / "q.png"))
    assert quiet.exit_code == 0 and "--negative needs --guidance above 1" in quiet.stderr
    with Image.open(tmp_path / "q.png") as image:  # it shaped nothing: not recorded as if it had
        assert image.text["negative_prompt"] == ""


def test_a_prompt_past_the_text_encoders_window_is_a_warning(tiny_sdxl, tmp_path):
    head = "the sea " * 37 + "a "  # 75 tokens of the tiny tokenizer: 77 with start and end
    common = ("--model", str(tiny_sdxl), "--steps", "1", *TINY_SIDE, "--seed", "1",
              "--guidance", "2", "--negative")
    result = _imagine(head + "and a lighthouse", *common, head + "and fog",
                      "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 0, result.output + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "text encoder reads" in line]
    assert len(warnings) == 2, result.stderr  # once each, though SDXL has two tokenizers
    prompt, negative = warnings
    assert prompt.startswith("warning: the prompt is 90 tokens and the text encoder reads the "
                             "first 77;")
    assert prompt.endswith('ignores "and a lighthouse"')
    assert negative.startswith("warning: --negative is 83 tokens")
    assert negative.endswith('ignores "and fog"')
    short = _imagine("a sea", *common, "fog", "-o", str(tmp_path / "b.png"))
    assert short.exit_code == 0 and "text encoder reads" not in short.stderr


def test_default_output_goes_under_checkpoints_images(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _imagine("A calm sea!", "--model", str(tiny_sd), "--steps", "1", *TINY_SIDE,
                      "--seed", "42")
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "checkpoints" / "images" / "a-calm-sea-42.png").is_file()


# ---------------------------------------------------------------------------------------------
# The library: loading, callback, attention, variants


def test_callback_drives_progress_and_attention_is_sdpa(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from llmcli.imagine import ImageRequest, draw, load_pipeline

    loaded = load_pipeline(str(tiny_sd), "cpu", "auto")
    assert loaded.variant is None and str(loaded.dtype) == "torch.float32"
    assert loaded.sdpa
    assert all(isinstance(p, AttnProcessor2_0) for p in loaded.pipe.unet.attn_processors.values())
    steps: list[tuple[int, int]] = []
    image = draw(loaded, ImageRequest("a sea", steps=3, width=32, height=40), seed=0,
                 on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert image.size == (32, 40)


def test_fp16_variant_is_used_and_missing_variant_falls_back(tiny_sd, tmp_path):
    import torch

    from llmcli.imagine import load_pipeline

    loaded = load_pipeline(str(tiny_sd), "cpu", "fp16")  # no fp16 files: cast the full weights
    assert loaded.variant is None and loaded.pipe.unet.dtype == torch.float16
    loaded.pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = load_pipeline(str(tmp_path / "fp16"), "cpu", "fp16")
    assert half.variant == "fp16" and half.pipe.unet.dtype == torch.float16
    full = load_pipeline(str(tmp_path / "fp16"), "cpu", "fp32")  # only fp16 files: upcast them
    assert full.variant == "fp16" and full.pipe.unet.dtype == torch.float32


def test_pickled_weights_are_refused(tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "pickled"
    shutil.copytree(tiny_sd, model)
    shutil.rmtree(model / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd / "unet").save_pretrained(
        model / "unet", safe_serialization=False)
    assert (model / "unet" / "diffusion_pytorch_model.bin").is_file()
    result = _imagine("a sea", "--model", str(model), "--steps", "1", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "unet/ has only pickled weights" in _one_error_line(result)
    assert not (tmp_path / "x.png").exists()


def _drop_weights(path: Path, marker: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    kept = {key: value for key, value in tensors.items() if marker not in key}
    save_file(kept, path, metadata={"format": "pt"})


def _break(model: Path, how: str) -> None:
    """Damage a pipeline folder copy the way a half-copied or hand-edited download is damaged."""
    if how == "no tokenizer":
        shutil.rmtree(model / "tokenizer")
    elif how == "tokenizer without vocabulary":
        (model / "tokenizer" / "tokenizer.json").unlink()
    elif how == "class of another pipeline":
        index = json.loads((model / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionXLPipeline"
        (model / "model_index.json").write_text(json.dumps(index))
    elif how == "unet tensor":
        _drop_weights(model / "unet" / "diffusion_pytorch_model.safetensors", "conv_out.weight")
    elif how == "text encoder layer":
        _drop_weights(model / "text_encoder" / "model.safetensors", "layers.1.")


@pytest.mark.parametrize(("how", "expected"), [
    ("no tokenizer", "tokenizer/ is missing or incomplete (model_index.json names a CLIPTokenizer"),
    ("tokenizer without vocabulary", "tokenizer/ is missing or incomplete (the tokenizer has no"),
    ("class of another pipeline", "text_encoder_2/ is missing or incomplete"),
    ("unet tensor", "unet/ is missing or incomplete (its weights lack conv_out.weight"),
    ("text encoder layer", "text_encoder/ is missing or incomplete (its weights lack encoder."
                           "layers.1."),
])
def test_a_pipeline_with_a_part_missing_is_refused_before_drawing(how, expected, tiny_sd,
                                                                 tmp_path):
    model = tmp_path / "broken"
    shutil.copytree(tiny_sd, model)
    _break(model, how)
    result = _imagine("a sea", "--model", str(model), "--steps", "1", *TINY_SIDE, "-o",
                      str(tmp_path / "x.png"))
    assert result.exit_code == 2, result.output + result.stderr
    assert f"--model {model}: {expected}" in _one_error_line(result)
    assert not (tmp_path / "x.png").exists()


def test_weights_left_on_meta_are_refused_whatever_the_library_logs(tiny_sd, tmp_path,
                                                                     monkeypatch):
    import llmcli.imagine as imagine

    monkeypatch.setattr(imagine, "_weight_reports", lambda message: [])  # a report not understood
    model = tmp_path / "broken"
    shutil.copytree(tiny_sd, model)
    _break(model, "unet tensor")
    result = _imagine("a sea", "--model", str(model), *TINY_SIDE, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "unet/ is missing or incomplete (its weights lack conv_out.weight" in _one_error_line(
        result)


def test_unused_weights_are_a_warning(tiny_sd, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "extra"
    shutil.copytree(tiny_sd, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "extra.weight": torch.zeros(2)}, weights,
              metadata={"format": "pt"})
    result = _imagine("a sea", "--model", str(model), *TINY_SIDE, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 0, result.output + result.stderr
    assert "vae/ holds weights its model does not use (e.g. extra.weight)" in result.stderr


def test_load_reports_of_every_library_version_are_read():
    from llmcli.imagine import WeightReport, _weight_reports

    table = ("\x1b[1mCLIPTextModel LOAD REPORT\x1b[0m from: /m/text_encoder\n"
             "Key | Status | \n----+--------+-\nlogit_scale | \x1b[33mUNEXPECTED\x1b[0m | \n"
             "encoder.layers.1.mlp.fc1.bias | \x1b[31mMISSING\x1b[0m | \n\nNotes: ...")
    assert _weight_reports(table) == [WeightReport("MISSING", "text_encoder", "encoder.layers.1.mlp"
                                                   ".fc1.bias"),
                                      WeightReport("UNEXPECTED", "text_encoder", "logit_scale")]
    sentence = ("Some weights of CLIPTextModel were not initialized from the model checkpoint at "
                "/my models/p/text_encoder and are newly initialized: ['a.weight', 'b.bias']\n"
                "You should probably TRAIN this model")
    assert _weight_reports(sentence) == [WeightReport("MISSING", "text_encoder", "a.weight")]
    unused = ("Some weights of the model checkpoint at p/vae were not used when initializing "
              "AutoencoderKL: \n ['extra.weight, other.bias']")
    assert _weight_reports(unused) == [WeightReport("UNEXPECTED", "vae", "extra.weight")]
    assert _weight_reports("The config attributes {'a': 1} were passed to X") == []


def test_output_names_and_slugs(tmp_path):
    from llmcli.imagine import IMAGES_DIR, output_paths, slug

    assert slug("画一个大海") == "画一个大海"
    assert slug("  A calm sea, at DAWN!! ") == "a-calm-sea-at-dawn"
    assert slug("!!!") == "image"
    assert len(slug("word " * 40)) <= 48
    assert output_paths(None, "a sea", 5, 1) == [IMAGES_DIR / "a-sea-5.png"]
    assert output_paths(tmp_path, "a sea", 5, 1) == [tmp_path / "a-sea-5.png"]
    names = [p.name for p in output_paths(tmp_path / "x.PNG", "p", 0, 10)]
    assert names[0] == "x-01.PNG" and names[-1] == "x-10.PNG" and len(set(names)) == 10
    folder = f"{tmp_path}/new/"  # a new folder, said with its slash (a Path would drop it)
    assert output_paths(folder, "a sea", 5, 1) == [tmp_path / "new" / "a-sea-5.png"]


def test_an_image_never_replaces_a_file_that_is_not_a_png(tmp_path):
    from llmcli.console import UserError
    from llmcli.imagine import output_paths

    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="is not a PNG image"):
        output_paths(notes, "sea", 1, 1)
    (tmp_path / "sea-1.png").write_text("also mine")
    with pytest.raises(UserError, match="is not a PNG image"):
        output_paths(tmp_path, "sea", 1, 1)
    assert notes.read_text() == "my notes"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model is loaded


@pytest.mark.parametrize(("args", "expected"), [
    (["--width", "100"], "--width 100: must be a multiple of 8"),
    (["--height", "0"], "--height 0: must be a multiple of 8"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--guidance", "-1"], "--guidance -1.0: must be in [0, 100]"),
    (["--guidance", "nan"], "--guidance nan: must be finite and in [0, 100]"),  # as inf says
    (["--device", ""], "--device '': empty; use auto, cpu"),  # was taken as auto
    (["-n", "0"], "--num-images 0: must be at least 1"),
    (["--seed", "-3"], "--seed -3: must be from 0"),
    (["-o", "out.jpg"], "use a name ending in .png"),
    (["-o", "out/.png"], "-o out/.png: give the image a name, e.g. -o out/image.png, or the "
                         f"folder, -o out{os.sep}, for the default name"),
    (["--dtype", "fp8"], "--dtype fp8: use auto, fp32, fp16, bf16"),
    (["--device", "tpu"], "--device tpu"),
    (["--model", "./no/such/dir"], "no such folder, and not a Hugging Face model id"),
    (["--model", ""], "--model '': give a pipeline folder or a Hugging Face model id"),
    (["--model", "stabilityai/sdxl turbo"], "not a Hugging Face model id (owner/name"),
    (["--model", "a/b..c"], "not a Hugging Face model id (owner/name"),
    (["--model", "a/é"], "not a Hugging Face model id (owner/name"),
    (["--model", "a/" + "x" * 97], "not a Hugging Face model id (owner/name"),
])
def test_bad_input_is_one_line_exit_2(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _imagine("a sea", "--model", "./no/such/dir", *args)
    assert result.exit_code == 2, result.output + result.stderr
    assert expected in _one_error_line(result)
    assert not any(tmp_path.rglob("*.png"))


def test_empty_prompt_and_non_pipeline_folders(tmp_path):
    assert "PROMPT is empty" in _one_error_line(_imagine("   "))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    for model, expected in ((tmp_path, "no model_index.json"),
                            (tmp_path / "weights.safetensors", "is a file")):
        result = _imagine("a sea", "--model", str(model), "-o", str(tmp_path / "x.png"))
        assert result.exit_code == 2 and expected in _one_error_line(result)


@pytest.mark.parametrize("index, expected", [
    ("{}", "names no pipeline class"), ("[]", "names no pipeline class"),
    ('{"_class_name": 5}', "names no pipeline class"),
    ("not json", "cannot read model_index.json"),
    ('{"_class_name": "StableDiffusionPipeline", "unet": 5}', "cannot load this pipeline"),
])
def test_a_malformed_model_index_is_one_line(index, expected, tmp_path):
    (tmp_path / "model_index.json").write_text(index)
    result = _imagine("a sea", "--model", str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and expected in _one_error_line(result)


def test_output_under_a_file_fails_before_loading(tmp_path):
    (tmp_path / "taken").write_text("x")
    result = _imagine("a sea", "--model", "./no/such/dir", "-o", str(tmp_path / "taken/a.png"))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith(f"error: -o {tmp_path / 'taken/a.png'}: ") and "is a file" in line


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache and the offline error (fresh processes: the hub reads its env at import)


def _run_llm(args: list[str], home: Path, timeout: float = 120,
             **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    environ.update(HF_HOME=str(home), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "llmcli", "imagine", "--device", "cpu", *args],
                          capture_output=True, text=True, env=environ, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_offline_and_not_cached_says_how_to_get_the_model(tmp_path):
    home = tmp_path / "empty-hf-home"
    proc = _run_llm(["画一个大海", "-o", str(tmp_path / "sea.png")], home, HF_HUB_OFFLINE="1")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "stabilityai/sdxl-turbo" in line and "HF_HUB_OFFLINE" in line
    assert "hf download stabilityai/sdxl-turbo" in line and "huggingface-cli download" in line
    assert "--model DIR" in line and str(home / "hub") in line
    assert not (tmp_path / "sea.png").exists()


def test_unreachable_hub_fails_fast_with_the_same_advice(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _run_llm(["a sea", "--model", "someone/tiny-turbo", "-o", str(tmp_path / "a.png")],
                    tmp_path / "hf", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "the Hugging Face Hub cannot be reached" in line
    assert "hf download someone/tiny-turbo" in line


@pytest.fixture
def stalling_hub():
    """A Hub on 127.0.0.1 that answers the model lookup and then, for files, says nothing (mode
    "all") or sends the headers but no bytes (mode "body"); yields a function of the mode that
    returns its address."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()
    servers = []

    def serve(mode: str) -> str:
        class Hub(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, body: bool) -> None:
                if self.path.startswith("/api/models/"):
                    data = json.dumps({"id": "me/pipe", "sha": "a" * 40, "siblings": []}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
                if mode == "body":
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", "a" * 40)
                    self.send_header("ETag", '"e1"')
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    if not body:
                        return
                release.wait(60)

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["all", "body"])
def test_a_hub_that_stops_answering_is_one_line_after_one_timeout(mode, stalling_hub, tmp_path):
    proc = _run_llm(["a sea", "--model", "me/pipe", "-o", str(tmp_path / "a.png")],
                    tmp_path / "hf", timeout=60, HF_ENDPOINT=stalling_hub(mode),
                    HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert proc.returncode == 1, proc.stderr
    line = _error_line(proc)
    assert "me/pipe: the Hugging Face Hub stopped answering during the download" in line
    assert "hf download me/pipe" in line
    for chatter in ("Retrying", "thrown while requesting", "Trying to resume"):
        assert chatter not in proc.stderr.replace(line, "")
    assert not (tmp_path / "a.png").exists()


def test_cached_hub_model_loads_offline(tiny_sdxl, tmp_path):
    home = tmp_path / "hf"
    repo = home / "hub" / "models--someone--tiny-turbo"
    commit = "0" * 40
    shutil.copytree(tiny_sdxl, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = _run_llm(["a sea", "--model", "someone/tiny-turbo", "--width", "32", "--height", "32",
                     "--seed", "9", "-o", str(tmp_path / "a.png")], home, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "a.png") as image:
        assert image.text["model"] == "someone/tiny-turbo" and image.text["steps"] == "1"


def test_partly_cached_model_offline_is_one_line(tiny_sd, tmp_path, monkeypatch):
    import llmcli.imagine as imagine

    partial = tmp_path / "snapshot"
    shutil.copytree(tiny_sd, partial)
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(imagine, "locate_model",
                        lambda model: imagine.ModelSource(str(partial), False, True))
    monkeypatch.setattr(imagine, "_hub_offline", lambda: True)
    result = _imagine("a sea", "--model", "someone/tiny-turbo", "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "someone/tiny-turbo: is only partly in the Hugging Face cache" in line
    assert "hf download someone/tiny-turbo" in line


# ---------------------------------------------------------------------------------------------
# Damaged files, sizes the pipeline cannot make, and what the Hub answered


@pytest.mark.parametrize("part", ["text_encoder/model.safetensors",
                                  "unet/diffusion_pytorch_model.safetensors",
                                  "tokenizer/tokenizer.json"])
def test_a_damaged_file_is_named(part, tiny_sd, tmp_path):
    """A text encoder cut short was "error: SafetensorError: ..." (exit 1, no file named), a
    tokenizer file "cannot load this pipeline: Expecting ..." without its name."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd, folder)
    damaged = folder / part
    damaged.write_bytes(damaged.read_bytes()[:50])
    result = _imagine("a sea", "--model", str(folder), "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 2, result.output
    assert _one_error_line(result) .startswith(
        f"error: --model {folder}: {part}: cannot read it (")
    assert not (tmp_path / "a.png").exists()


def test_a_size_the_pipeline_would_floor_is_refused(tiny_sd, tmp_path, monkeypatch):
    """A pipeline whose VAE scales by 16 drew 40x72 as 32x64 while the PNG said 40x72."""
    import llmcli.imagine as imagine

    real = imagine.load_pipeline

    def scale_16(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.pipe.vae_scale_factor = 16
        return loaded

    monkeypatch.setattr(imagine, "load_pipeline", scale_16)
    result = _imagine("a sea", "--model", str(tiny_sd), "--width", "40", "--height", "32",
                      "-o", str(tmp_path / "a.png"))
    assert result.exit_code == 2, result.output
    assert "--width 40: StableDiffusionPipeline" in _one_error_line(result)
    assert "multiples of 16; use e.g. --width 48" in _one_error_line(result)
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("files, api, expected", [
    ({"*": "gated"}, "ok", "me/pipe: this model is gated; accept its licence on http://127.0.0.1"),
    ({}, "500", "me/pipe: the Hugging Face Hub answered 500 Internal Server Error for the model "
     "lookup; try again later"),
    ({"unet/*": "500"}, "ok", "me/pipe: the Hugging Face Hub answered 500 Internal Server Error "
     "for unet/"),
])
def test_what_the_hub_answered_is_said(files, api, expected, tiny_sd, tmp_path):
    """A gated repository (its files answer 403 GatedRepo) was "401 Client Error" or "not a
    valid model identifier"; an error answer was "cannot be reached" or "no answer"."""
    from helpers_hub import FakeHub

    hub = FakeHub(tiny_sd, files, api)
    try:
        proc = _run_llm(["a sea", "--model", "me/pipe", "-o", str(tmp_path / "a.png")],
                        tmp_path / "hf", timeout=120, HF_ENDPOINT=hub.url)
    finally:
        hub.close()
    assert proc.returncode == 1, proc.stderr
    assert _error_line(proc).startswith(f"error: --model {expected}"), proc.stderr
    assert "Retrying" not in proc.stderr and not (tmp_path / "a.png").exists()
