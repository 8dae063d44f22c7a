"""`llm fetch` against a local HTTP server: resume, retries, checksums, refusals, hf://, presets."""

from __future__ import annotations

import dataclasses
import email.utils
import gzip
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from llmcli.console import EXIT_FAILURE, EXIT_USAGE, UserError
from llmcli.data import fetch as fetch_mod
from llmcli.data.fetch import (
    PRESETS,
    RETIRED,
    download,
    fetch,
    resolve_source,
    resolve_url,
    safe_filename,
)

BODY = bytes(range(256)) * 400  # 100 KB, every byte value


class Server:
    """Files over HTTP with Range/If-Range support, validators and scripted failures.

    Each file has an ETag and a Last-Modified date derived from its content, so changing
    `files[path]` changes both, as on a real server.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}  # send this many body bytes, then cut (once)
        self.always_drop: dict[str, int] = {}  # the same, every time
        self.stall_after: dict[str, tuple[int, float]] = {}  # send n bytes, then wait s
        self.fail_times: dict[str, int] = {}  # answer 503 this many times first
        self.retry_after: dict[str, str] = {}  # ... with this Retry-After header
        self.status: dict[str, int] = {}  # always answer with this status
        self.no_range: set[str] = set()  # ignore Range headers
        self.redirects: dict[str, str] = {}
        self.no_validators: set[str] = set()  # send neither ETag nor Last-Modified
        self.no_etag: set[str] = set()  # send Last-Modified only
        self.ignore_if_range: set[str] = set()  # honour Range even when If-Range is stale
        self.short_206: dict[str, int] = {}  # answer a plain GET with a 206 of the first n bytes
        self.gzip: set[str] = set()  # send the body gzip-encoded, whatever was asked
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path
                server.requests.append((path, dict(self.headers.items())))
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.status:
                    self.send_error(server.status[path])
                    return
                if server.fail_times.get(path, 0) > 0:
                    server.fail_times[path] -= 1
                    if path in server.retry_after:
                        self.send_response(503)
                        self.send_header("Retry-After", server.retry_after[path])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_error(503)
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                digest = hashlib.sha256(data).hexdigest()
                validators = {} if path in server.no_validators else {
                    "Last-Modified": email.utils.formatdate(int(digest[:7], 16), usegmt=True)}
                if path not in server.no_validators | server.no_etag:
                    validators["ETag"] = f'"{digest[:16]}"'
                start = 0
                header = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if (if_range and if_range not in validators.values()
                        and path not in server.ignore_if_range):
                    header = None  # RFC 9110: a stale If-Range gets the whole new file
                if header and path not in server.no_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                end = len(data)
                if header is None and path in server.short_206:
                    end = server.short_206[path]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-{end - 1}/{len(data)}")
                elif not header or path in server.no_range:
                    self.send_response(200)
                body = data[start:end]
                if path in server.gzip:
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                for key, value in validators.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.stall_after:
                    sent, pause = server.stall_after[path]
                    self.wfile.write(body[:sent])
                    self.wfile.flush()
                    time.sleep(pause)
                    return
                cut = server.drop_after.pop(path, server.always_drop.get(path))
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_then_no_redownload(server: Server, tmp_path: Path) -> None:
    server.files["/corpus.txt"] = BODY
    path = fetch(f"{server.url}/corpus.txt", tmp_path, backoff=0)
    assert path == tmp_path / "corpus.txt"
    assert path.read_bytes() == BODY
    assert not (tmp_path / "corpus.txt.part").exists()
    again = fetch(f"{server.url}/corpus.txt", tmp_path, sha256=sha(BODY), backoff=0)
    assert again == path
    assert server.paths() == ["/corpus.txt"]  # the second call asked the server nothing
    fetch(f"{server.url}/corpus.txt", tmp_path, force=True, backoff=0)
    assert server.paths() == ["/corpus.txt", "/corpus.txt"]


def test_resume_after_dropped_connection(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    server.drop_after["/big.bin"] = 30_000
    path = fetch(f"{server.url}/big.bin", tmp_path, sha256=sha(BODY), backoff=0)
    assert path.read_bytes() == BODY
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0][1]
    assert server.requests[1][1]["Range"] == "bytes=30000-"


def interrupted(server: Server, tmp_path: Path, path: str, cut: int) -> None:
    """A previous run that died after `cut` bytes, leaving its .part (and record) behind."""
    def killed(seconds: float) -> None:
        raise KeyboardInterrupt  # the process dies while waiting to retry

    server.drop_after[path] = cut
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(fetch_mod.time, "sleep", killed)
        fetch(f"{server.url}{path}", tmp_path, backoff=0)
    assert (tmp_path / (path.rsplit("/", 1)[-1] + ".part")).stat().st_size == cut


def test_resume_a_previous_runs_part_file(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    interrupted(server, tmp_path, "/big.bin", 12_345)
    assert "If-Range" not in server.requests[0][1]
    path = fetch(f"{server.url}/big.bin", tmp_path, backoff=0)
    assert path.read_bytes() == BODY
    assert server.requests[1][1]["Range"] == "bytes=12345-"
    assert server.requests[1][1]["If-Range"].startswith('"')
    # no .part, .part.json nor .lock left; the record of where big.bin came from
    assert sorted(os.listdir(tmp_path)) == [".big.bin.fetched.json", "big.bin"]


def test_complete_part_file_is_finished_without_a_body(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    part = tmp_path / "big.bin.part"
    part.write_bytes(BODY)  # a run that died after the last byte, before the rename
    fetch_mod._write_record(tmp_path / "big.bin.part.json", f"{server.url}/big.bin",
                            f'"{sha(BODY)[:16]}"', part.stat())
    assert fetch(f"{server.url}/big.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert len(server.requests) == 1 and server.requests[0][1]["Range"] == f"bytes={len(BODY)}-"


def test_an_earlier_versions_partial_download_still_resumes(server: Server,
                                                            tmp_path: Path) -> None:
    """Its record is {url, validator} without the mark and the file it names."""
    server.files["/big.bin"] = BODY
    (tmp_path / "big.bin.part").write_bytes(BODY[:5000])
    (tmp_path / "big.bin.part.json").write_text(json.dumps(
        {"url": f"{server.url}/big.bin", "validator": f'"{sha(BODY)[:16]}"'}))
    assert fetch(f"{server.url}/big.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert server.requests[0][1]["Range"] == "bytes=5000-"


def test_server_without_range_support_starts_over(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    interrupted(server, tmp_path, "/big.bin", 30_000)
    server.no_range.add("/big.bin")
    assert fetch(f"{server.url}/big.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert "Range" in server.requests[-1][1]  # asked for the rest, got the whole file


def test_transient_errors_are_retried(server: Server, tmp_path: Path) -> None:
    server.files["/flaky.txt"] = b"worth the wait\n"
    server.fail_times["/flaky.txt"] = 2
    path = fetch(f"{server.url}/flaky.txt", tmp_path, backoff=0)
    assert path.read_bytes() == b"worth the wait\n"
    assert len(server.requests) == 3


def test_gives_up_with_a_one_line_hint(server: Server, tmp_path: Path) -> None:
    server.status["/down.txt"] = 503
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/down.txt", tmp_path, retries=2, backoff=0)
    message = str(info.value)
    assert info.value.exit_code == EXIT_FAILURE
    assert "503" in message and "3 attempts" in message and "local path" in message
    assert "\n" not in message
    assert len(server.requests) == 3
    assert not (tmp_path / "down.txt").exists()


def test_restarting_from_zero_is_not_progress(server: Server, tmp_path: Path) -> None:
    """A server that cannot resume and keeps dropping the connection sends the same first bytes
    every time: the retries run out instead of going on for ever."""
    server.files["/short.bin"] = BODY
    server.no_range.add("/short.bin")
    server.always_drop["/short.bin"] = 30_000
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/short.bin", tmp_path, retries=2, backoff=0)
    assert info.value.exit_code == EXIT_FAILURE
    # the first attempt's 30 KB are progress; the next three (retries=2) get no further
    assert "gave up after 4 attempts" in str(info.value)
    assert len(server.requests) == 4
    with pytest.raises(UserError, match="gave up after 1 attempt\\)"):  # 0: no retry at all
        fetch(f"{server.url}/short.bin", tmp_path, retries=0, backoff=0)


def test_a_resume_that_gets_further_resets_the_retries(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    server.always_drop["/big.bin"] = 20_000  # each attempt adds 20 KB: five cuts, then done
    path = fetch(f"{server.url}/big.bin", tmp_path, retries=1, backoff=0)
    assert path.read_bytes() == BODY
    assert len(server.requests) == 6


def test_bytes_are_kept_as_they_arrive(server: Server, tmp_path: Path) -> None:
    """A slow server's bytes reach the .part file as they come, not a MiB at a time, so an
    interrupted download keeps them for the next run."""
    server.files["/slow.bin"] = BODY
    server.stall_after["/slow.bin"] = (1_000, 2.0)
    with pytest.raises(UserError, match="gave up after 1 attempt\\)"):
        fetch(f"{server.url}/slow.bin", tmp_path, retries=0, backoff=0, timeout=0.3)
    assert (tmp_path / "slow.bin.part").stat().st_size == 1_000


def test_the_run_says_what_it_downloaded_after_a_resume(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    interrupted(server, tmp_path, "/big.bin", 12_345)
    result = run_cli("fetch", f"{server.url}/big.bin", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"downloaded {(len(BODY) - 12_345) / 1000:.1f} KB" in result.stderr
    assert "resumed after 12.3 KB from an earlier run" in result.stderr


@pytest.mark.parametrize("url", ["http://[::1/x.txt", "http://127.0.0.1:abc/p.txt",
                                 "http://127.0.0.1:99999/p.txt", "http://127.0.0.1:0/p.txt",
                                 "http://127.0.0.1/a b.txt", "http://127.0.0.1/a\tb.txt",
                                 "http://:80/p.txt"])
def test_malformed_urls_are_refused_before_any_request(url: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        fetch(url, tmp_path, backoff=0)
    assert info.value.exit_code == EXIT_USAGE
    assert "\n" not in str(info.value) and url.split("/")[2][:5] in str(info.value)
    assert not any(tmp_path.iterdir())


def test_a_redirect_loop_is_one_line(server: Server, tmp_path: Path) -> None:
    server.redirects["/loop"] = "/loop"
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/loop", tmp_path, backoff=0)
    assert "\n" not in str(info.value) and "redirecting" in str(info.value)


def test_a_symlink_out_of_the_folder_is_named_as_such(server: Server, tmp_path: Path) -> None:
    server.files["/ok.txt"] = b"new\n"
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "v.txt").write_text("v\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.txt").symlink_to(tmp_path / "real" / "v.txt")
    with pytest.raises(UserError, match="ok.txt is a symbolic link to .*outside"):
        fetch(f"{server.url}/ok.txt", tmp_path / "data", force=True, backoff=0)
    assert (tmp_path / "real" / "v.txt").read_text() == "v\n"


def test_control_characters_in_a_file_name_are_named(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="control character"):
        fetch(f"{server.url}/named/%00.txt", tmp_path, backoff=0)
    assert server.requests == []


def test_builtin_checks_a_given_sha256(tmp_path: Path) -> None:
    path = fetch("builtin", tmp_path)
    assert fetch("builtin", tmp_path, sha256=sha(path.read_bytes())) == path
    with pytest.raises(UserError, match="SHA-256 is .*expected 0{64}"):
        fetch("builtin", tmp_path, sha256="0" * 64)


def test_builtin_never_replaces_a_file_llm_did_not_write(tmp_path: Path, monkeypatch) -> None:
    """`llm fetch builtin` (and data.source=builtin) replaced a user's own python-reference.txt
    with the corpus, without a word, wherever its bytes differed from it."""
    mine = tmp_path / "python-reference.txt"
    mine.write_text("my own notes\n")
    with pytest.raises(UserError, match="not this Python's built-in corpus.*--force"):
        fetch("builtin", tmp_path)
    with pytest.raises(UserError, match="not this Python's built-in corpus"):
        resolve_source("builtin", tmp_path)  # pretrain's and finetune's way there
    assert mine.read_text() == "my own notes\n"
    assert fetch("builtin", tmp_path, force=True) == mine
    assert mine.read_text() == fetch_mod.builtin_text()
    monkeypatch.setattr(fetch_mod, "builtin_text", lambda: "another Python's corpus\n")
    assert fetch("builtin", tmp_path).read_text() == "another Python's corpus\n"  # llm's own
    with mine.open("a") as fh:  # edited since llm wrote it: the user's now
        fh.write("my note\n")
    monkeypatch.undo()
    with pytest.raises(UserError, match="not this Python's built-in corpus"):
        fetch("builtin", tmp_path)
    (tmp_path / "x.txt").write_text("a download")
    fetch_mod._write_source(fetch_mod.source_record(mine), "https://host/x.txt", tmp_path / "x.txt")
    (tmp_path / "x.txt").rename(mine)
    with pytest.raises(UserError, match="came from https://host/x.txt"):
        fetch("builtin", tmp_path)
    assert mine.read_text() == "a download"


def test_unreachable_host_says_what_failed(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as info:
        fetch(f"http://127.0.0.1:{port}/x.txt", tmp_path, retries=1, backoff=0)
    assert "could not download" in str(info.value) and "data.source" in str(info.value)


def test_not_found_is_bad_input(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/missing.txt", tmp_path, backoff=0)
    assert info.value.exit_code == EXIT_USAGE
    assert "404" in str(info.value)
    assert len(server.requests) == 1  # not retried


def test_checksum_mismatch_is_kept_aside(server: Server, tmp_path: Path) -> None:
    server.files["/corpus.txt"] = BODY
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/corpus.txt", tmp_path, sha256="0" * 64, backoff=0)
    assert "SHA-256 mismatch" in str(info.value)
    assert not (tmp_path / "corpus.txt").exists()
    assert not (tmp_path / "corpus.txt.part").exists()
    assert (tmp_path / "corpus.txt.bad").read_bytes() == BODY
    with pytest.raises(UserError, match=r"kept aside as .*corpus.txt.bad.1;"):  # never over one
        fetch(f"{server.url}/corpus.txt", tmp_path, sha256="0" * 64, backoff=0)
    assert (tmp_path / "corpus.txt.bad").read_bytes() == BODY
    assert (tmp_path / "corpus.txt.bad.1").read_bytes() == BODY


def test_existing_file_with_wrong_checksum_is_refused(server: Server, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes(b"something else")
    with pytest.raises(UserError, match="--force"):
        fetch(f"{server.url}/corpus.txt", tmp_path, sha256=sha(BODY), backoff=0)
    assert server.requests == []


def test_bad_checksum_argument(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="64 hexadecimal"):
        fetch("http://127.0.0.1/x.txt", tmp_path, sha256="abc")


@pytest.mark.parametrize("source", ["ftp://example.com/a.txt", "file:///etc/passwd",
                                    "s3://bucket/key.txt", "javascript://x"])
def test_other_schemes_are_refused(source: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unsupported URL scheme"):
        fetch(source, tmp_path)


@pytest.mark.parametrize("name", ["..", ".", "", "../evil.txt", "a/b.txt", "..\\evil.txt",
                                  "/etc/passwd"])
def test_escaping_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="refusing file name"):
        safe_filename(name, tmp_path)


def test_escaping_url_names_are_refused(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="refusing file name"):
        fetch(f"{server.url}/files/..%2F..%2Fevil.txt", tmp_path / "data")
    with pytest.raises(UserError, match="ends with '/'"):
        fetch(f"{server.url}/files/", tmp_path)
    assert server.requests == []
    assert not (tmp_path / "evil.txt").exists()


def test_redirect_to_other_scheme_is_refused(server: Server, tmp_path: Path) -> None:
    server.redirects["/r.txt"] = "ftp://example.com/r.txt"
    with pytest.raises(UserError, match="not http"):
        fetch(f"{server.url}/r.txt", tmp_path, backoff=0)


def test_hf_address_endpoint_token_and_revision(server: Server, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.files["/datasets/owner/name/resolve/main/sub/dir/train.txt"] = b"hello hf\n"
    server.files["/datasets/owner/name/resolve/v1.0/train.txt"] = b"old\n"
    path = fetch("hf://datasets/owner/name/sub/dir/train.txt", tmp_path, backoff=0)
    assert path == tmp_path / "train.txt" and path.read_bytes() == b"hello hf\n"
    assert server.requests[0][1]["Authorization"] == "Bearer hf_secret"
    path = fetch("hf://datasets/owner/name@v1.0/train.txt", tmp_path / "v1", backoff=0)
    assert path.read_bytes() == b"old\n"


def test_hf_token_is_not_sent_to_redirect_targets(server: Server, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.redirects["/datasets/o/n/resolve/main/f.txt"] = f"{server.url}/cdn/f.txt"
    server.files["/cdn/f.txt"] = BODY
    server.drop_after["/cdn/f.txt"] = 5000  # the resumed request is redirected too
    assert fetch("hf://datasets/o/n/f.txt", tmp_path, backoff=0).read_bytes() == BODY
    hf = [h for p, h in server.requests if p.startswith("/datasets/")]
    cdn = [h for p, h in server.requests if p.startswith("/cdn/")]
    assert all(h.get("Authorization") == "Bearer hf_secret" for h in hf)
    assert cdn and not any("Authorization" in h for h in cdn)
    assert cdn[-1]["Range"] == "bytes=5000-"


@pytest.mark.parametrize("bad", ["hf://models/o/n/f.txt", "hf://datasets/o/n", "hf://datasets//n/f"])
def test_malformed_hf_addresses(bad: str) -> None:
    with pytest.raises(UserError, match="hf://datasets/OWNER/NAME/PATH"):
        resolve_url(bad)


def test_gated_hf_file_mentions_token(server: Server, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.status["/datasets/o/n/resolve/main/f.txt"] = 401
    with pytest.raises(UserError, match="HF_TOKEN"):
        fetch("hf://datasets/o/n/f.txt", tmp_path, backoff=0)


def test_preset_downloads_from_hf_endpoint(server: Server, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    text = b"Chapter 1: Building Rapport\n"
    monkeypatch.setitem(PRESETS, "sales-textbook",
                        dataclasses.replace(PRESETS["sales-textbook"], sha256=sha(text)))
    server.files["/datasets/goendalf666/sales-textbook_for_convincing_and_selling/resolve/main/"
                 "sales_textbook.txt"] = text
    path = resolve_source("sales-textbook", tmp_path)
    assert path == tmp_path / "sales_textbook.txt"
    assert path.read_bytes().startswith(b"Chapter 1")
    assert resolve_source("sales-textbook", tmp_path) == path
    assert len(server.requests) == 1


def test_preset_checksum_is_enforced(server: Server, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    preset = PRESETS["tinyshakespeare"]
    assert preset.sha256 and len(preset.sha256) == 64
    fake = fetch_mod.Preset("fake", f"{server.url}/input.txt", "shakespeare.txt",
                            preset.sha256, "test")
    monkeypatch.setitem(PRESETS, "fake", fake)
    server.files["/input.txt"] = b"not shakespeare"
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        fetch("fake", tmp_path, backoff=0)
    assert not (tmp_path / "shakespeare.txt").exists()


@pytest.mark.parametrize("name", ["tinyshakespeare", "sales-textbook"])
def test_preset_matches_the_shared_copy(name: str, shared_data: Path) -> None:
    filename = PRESETS[name].filename
    data = (shared_data / filename).read_bytes()
    assert sha(data) == PRESETS[name].sha256
    sums = {file: digest for digest, file in
            (line.split() for line in (shared_data / "SHA256SUMS").read_text().splitlines())}
    assert sums[filename] == PRESETS[name].sha256


def test_every_downloading_preset_is_verified() -> None:
    assert PRESETS["builtin"].source == ""  # generated offline: nothing to verify
    downloading = [p for p in PRESETS.values() if p.source]
    assert downloading
    for preset in downloading:
        assert preset.sha256 and re.fullmatch(r"[0-9a-f]{64}", preset.sha256), preset.name


def test_retired_preset_says_how_to_get_the_file(tmp_path: Path) -> None:
    assert "webnovel-cn" not in PRESETS
    with pytest.raises(UserError, match="no longer a preset") as info:
        fetch("webnovel-cn", tmp_path)
    assert RETIRED["webnovel-cn"] in str(info.value)


def test_resolve_source_local_builtin_and_unknown(tmp_path: Path) -> None:
    local = tmp_path / "mine.txt"
    local.write_text("text\n")
    assert resolve_source(str(local), tmp_path / "data") == local
    builtin = resolve_source("builtin", tmp_path / "data")
    assert builtin.parent == tmp_path / "data" and builtin.stat().st_size > 300_000
    mtime = builtin.stat().st_mtime_ns
    assert resolve_source("builtin", tmp_path / "data").stat().st_mtime_ns == mtime
    with pytest.raises(UserError) as info:
        resolve_source("sales-texbook", tmp_path / "data")
    message = str(info.value)
    assert "builtin" in message and "tinyshakespeare" in message and "path" in message
    with pytest.raises(UserError, match="no such file"):
        resolve_source("corpora/missing.txt", tmp_path / "data")


def test_a_data_folder_training_cannot_write_says_what_training_can_do(tmp_path: Path) -> None:
    """pretrain/finetune data.source=builtin where data/ cannot be made said "use another
    directory (llm fetch -o DIR)", an option the training commands do not have."""
    (tmp_path / "afile").write_text("a file")
    with pytest.raises(UserError) as info:
        resolve_source("builtin", tmp_path / "afile" / "data")
    assert str(info.value).endswith(
        "part of this path is a file, not a directory: run from a folder you can write to "
        "(training fetches into its data/), or fetch it with llm fetch -o DIR and give that "
        "file as data.source")


def test_download_keeps_nothing_half_written_on_failure(server: Server, tmp_path: Path) -> None:
    server.status["/never.bin"] = 500
    with pytest.raises(UserError):
        download(f"{server.url}/never.bin", tmp_path / "never.bin", retries=0, backoff=0)
    assert not (tmp_path / "never.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------
# The command


def run_cli(*args: str) -> Result:
    from llmcli.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_fetch_builtin_prints_the_path(tmp_path: Path) -> None:
    result = run_cli("fetch", "builtin", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "python-reference.txt")


def test_cli_fetch_list_and_errors(tmp_path: Path) -> None:
    listing = run_cli("fetch", "--list")
    assert listing.exit_code == 0
    for name in ("builtin", "sales-textbook", "tinyshakespeare"):
        assert name in listing.stdout
    assert listing.stdout.count("sha256:") == len(PRESETS) - 1
    bad = run_cli("fetch", "ftp://example.com/x.txt", "-o", str(tmp_path))
    assert bad.exit_code == EXIT_USAGE
    assert bad.stderr.count("\n") == 1 and "unsupported URL scheme" in bad.stderr
    assert "Traceback" not in bad.output
    none = run_cli("fetch")
    assert none.exit_code == EXIT_USAGE and "--list" in none.stderr


def test_cli_fetch_says_which_options_a_source_does_not_use(tmp_path: Path) -> None:
    """`--list builtin` listed the presets and dropped SOURCE; `fetch FILE --force` (a local
    path) and `builtin --retries 3` (written offline) dropped theirs without a word."""
    listed = run_cli("fetch", "--list", "builtin")
    assert listed.exit_code == EXIT_USAGE and listed.stdout == ""
    assert listed.stderr.startswith("error: SOURCE: not used with --list")
    local = tmp_path / "mine.txt"
    local.write_text("text\n")
    kept = run_cli("fetch", str(local), "--force")
    assert kept.exit_code == 0 and kept.stdout.strip() == str(local)
    assert "warning: --force: ignored; " in kept.stderr and "local path" in kept.stderr
    offline = run_cli("fetch", "builtin", "-o", str(tmp_path), "--retries", "3")
    assert offline.exit_code == 0 and "warning: --retries: ignored; builtin is written " \
        "offline" in offline.stderr


def test_cli_fetch_url(server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = b"abc\n"
    result = run_cli("fetch", f"{server.url}/c.txt", "-o", str(tmp_path),
                     "--sha256", sha(b"abc\n"))
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).read_bytes() == b"abc\n"
    listed = [n for n in os.listdir(tmp_path) if not n.startswith(".")]
    assert listed == ["c.txt"]  # the record of its source is hidden, as the lock was
    assert (tmp_path / ".c.txt.fetched.json").is_file()


# ---------------------------------------------------------------------------------------------
# Hardening: If-Range resume, symlinks, the lock file, bad arguments


def test_changed_remote_is_downloaded_afresh_not_spliced(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    interrupted(server, tmp_path, "/big.bin", 30_000)
    old_etag = f'"{sha(BODY)[:16]}"'
    new = bytes(reversed(BODY))  # same size: only the validator can tell the versions apart
    server.files["/big.bin"] = new
    path = fetch(f"{server.url}/big.bin", tmp_path, backoff=0)
    assert path.read_bytes() == new
    resumed = server.requests[-1][1]
    assert resumed["Range"] == "bytes=30000-" and resumed["If-Range"] == old_etag
    assert sorted(os.listdir(tmp_path)) == [".big.bin.fetched.json", "big.bin"]


def test_last_modified_is_the_validator_without_an_etag(server: Server, tmp_path: Path) -> None:
    server.files["/lm.bin"] = BODY
    server.no_etag.add("/lm.bin")
    server.drop_after["/lm.bin"] = 20_000
    assert fetch(f"{server.url}/lm.bin", tmp_path, backoff=0).read_bytes() == BODY
    resumed = server.requests[1][1]
    assert resumed["Range"] == "bytes=20000-" and resumed["If-Range"].endswith(" GMT")
    (tmp_path / "lm.bin").unlink()
    interrupted(server, tmp_path, "/lm.bin", 10_000)
    server.files["/lm.bin"] = new = bytes(reversed(BODY))
    assert fetch(f"{server.url}/lm.bin", tmp_path, backoff=0).read_bytes() == new


def test_without_validators_a_resume_starts_from_zero(server: Server, tmp_path: Path) -> None:
    server.files["/nv.bin"] = BODY
    server.no_validators.add("/nv.bin")
    server.drop_after["/nv.bin"] = 30_000
    assert fetch(f"{server.url}/nv.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert len(server.requests) == 2 and "Range" not in server.requests[1][1]
    (tmp_path / "nv.bin").unlink()
    interrupted(server, tmp_path, "/nv.bin", 30_000)
    record = json.loads((tmp_path / "nv.bin.part.json").read_text())
    assert record["validator"] is None  # nothing to vouch for the bytes
    server.files["/nv.bin"] = new = bytes(reversed(BODY))
    assert fetch(f"{server.url}/nv.bin", tmp_path, backoff=0).read_bytes() == new
    assert not any("Range" in h for _, h in server.requests)


def test_a_resume_of_another_version_is_refused_even_if_if_range_is_ignored(
        server: Server, tmp_path: Path) -> None:
    server.files["/ig.bin"] = BODY
    server.ignore_if_range.add("/ig.bin")
    interrupted(server, tmp_path, "/ig.bin", 30_000)
    server.files["/ig.bin"] = new = bytes(reversed(BODY))
    assert fetch(f"{server.url}/ig.bin", tmp_path, backoff=0).read_bytes() == new
    assert "Range" in server.requests[-2][1] and "Range" not in server.requests[-1][1]


def test_a_record_for_another_url_is_not_trusted(server: Server, tmp_path: Path) -> None:
    server.files["/a/f.bin"] = BODY
    server.files["/b/f.bin"] = new = bytes(reversed(BODY))
    interrupted(server, tmp_path, "/a/f.bin", 30_000)  # same file name, another URL
    assert fetch(f"{server.url}/b/f.bin", tmp_path, backoff=0).read_bytes() == new
    assert "Range" not in server.requests[-1][1]


def test_symlinked_part_file_is_not_written_through(server: Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    data = tmp_path / "data"
    data.mkdir()
    (data / "big.bin.part").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link") as info:
        fetch(f"{server.url}/big.bin", data, backoff=0)
    assert str(data / "big.bin.part") in str(info.value)
    assert victim.read_bytes() == b"precious"
    dangling = tmp_path / "created.txt"
    (data / "big.bin.part").unlink()
    (data / "big.bin.part").symlink_to(dangling)
    with pytest.raises(UserError, match="symbolic link"):
        fetch(f"{server.url}/big.bin", data, backoff=0)
    assert not dangling.exists()
    assert fetch(f"{server.url}/big.bin", data, force=True, backoff=0).read_bytes() == BODY


def test_symlinked_part_file_opened_late_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "x.part").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        fetch_mod._open_part(tmp_path / "x.part", append=True)  # the race after the check
    assert victim.read_bytes() == b"precious"


def test_symlinked_lock_file_is_not_followed(server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = b"abc\n"
    dangling = tmp_path / "created.txt"
    data = tmp_path / "data"
    data.mkdir()
    (data / ".c.txt.lock").symlink_to(dangling)
    with pytest.raises(UserError, match="symbolic link") as info:
        fetch(f"{server.url}/c.txt", data, backoff=0)
    assert ".c.txt.lock" in str(info.value) and info.value.exit_code == EXIT_USAGE
    assert not dangling.exists() and server.requests == []


def test_no_lock_file_remains(server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = b"abc\n"
    fetch(f"{server.url}/c.txt", tmp_path, backoff=0)
    fetch(f"{server.url}/c.txt", tmp_path, backoff=0)  # already complete
    with pytest.raises(UserError):
        fetch(f"{server.url}/missing.txt", tmp_path, backoff=0)
    with pytest.raises(UserError):
        fetch(f"{server.url}/c.txt", tmp_path / "bad", sha256="0" * 64, backoff=0)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".lock")]


def test_lock_excludes_while_its_file_is_removed(tmp_path: Path) -> None:
    target, active, overlaps = tmp_path / "f.bin", [0], []

    def worker() -> None:
        for _ in range(25):
            with fetch_mod.locked(target):
                active[0] += 1
                overlaps.append(active[0] > 1)
                os.sched_yield()
                active[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(overlaps) == 100 and not any(overlaps)
    assert not (tmp_path / ".f.bin.lock").exists()


@pytest.mark.parametrize("value", ["", "  ", "abc", "g" * 64, "0" * 63])
def test_empty_or_malformed_sha256_is_refused(value: str, server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = b"abc\n"
    with pytest.raises(UserError, match="64 hexadecimal"):
        fetch(f"{server.url}/c.txt", tmp_path, sha256=value)
    with pytest.raises(UserError, match="64 hexadecimal"):
        download(f"{server.url}/c.txt", tmp_path / "c.txt", sha256=value)
    assert server.requests == [] and not (tmp_path / "c.txt").exists()


def test_name_too_long_is_refused(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bytes long") as info:
        fetch(f"{server.url}/{'a' * 300}.txt", tmp_path)
    assert info.value.exit_code == EXIT_USAGE and server.requests == []


def assert_one_line_usage_error(result: Result, *needles: str) -> None:
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_cli_bad_arguments_are_one_line_errors(server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = b"abc\n"
    url = f"{server.url}/c.txt"
    assert_one_line_usage_error(run_cli("fetch", url, "--sha256", ""), "--sha256 ''")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_usage_error(run_cli("fetch", url, "-o", str(afile)), str(afile), "-o")
    assert_one_line_usage_error(run_cli("fetch", "builtin", "-o", str(afile)), str(afile))
    assert_one_line_usage_error(run_cli("fetch", url, "-o", str(afile / "sub")), str(afile))
    assert_one_line_usage_error(run_cli("fetch", f"{server.url}/{'n' * 300}", "-o",
                                        str(tmp_path)), "bytes long")
    (tmp_path / "d" / "c.txt").mkdir(parents=True)
    assert_one_line_usage_error(run_cli("fetch", url, "-o", str(tmp_path / "d")),
                                str(tmp_path / "d" / "c.txt"), "directory")
    (tmp_path / "p" / "c.txt.part").mkdir(parents=True)
    assert_one_line_usage_error(run_cli("fetch", url, "-o", str(tmp_path / "p")), ".part")
    assert_one_line_usage_error(run_cli("fetch", str(tmp_path / "d"), "--sha256", "0" * 64),
                                "not a file")
    assert server.requests == []


def test_cli_prints_user_strings_literally(tmp_path: Path) -> None:
    result = run_cli("fetch", "ftp://example.com/[/x][bold]y.txt", "-o", str(tmp_path))
    assert_one_line_usage_error(result, "ftp://example.com/[/x][bold]y.txt")
    assert_one_line_usage_error(run_cli("fetch", "ftp://a\nb.txt"), "ftp://a\\nb.txt")


# ---------------------------------------------------------------------------------------------
# llm's own temporary files are never confused with the user's


def test_a_file_named_like_a_part_file_is_never_taken(server: Server, tmp_path: Path) -> None:
    server.files["/c.txt"] = BODY
    server.files["/c.txt.part"] = b"mine, a real download\n"
    server.files["/c.txt.part.json"] = b'{"url": "not a record of llm"}\n'
    assert fetch(f"{server.url}/c.txt.part", tmp_path, backoff=0).name == "c.txt.part"
    for force in (False, True):
        with pytest.raises(UserError, match="c.txt.part is in the way") as info:
            fetch(f"{server.url}/c.txt", tmp_path, force=force, backoff=0)
        assert info.value.exit_code == EXIT_USAGE and "\n" not in str(info.value)
        assert "move it away, or use another directory (llm fetch -o DIR)" in str(info.value)
    assert (tmp_path / "c.txt.part").read_bytes() == b"mine, a real download\n"
    (tmp_path / "c.txt.part").rename(tmp_path / "kept")
    fetch(f"{server.url}/c.txt.part.json", tmp_path, backoff=0)
    with pytest.raises(UserError, match="c.txt.part.json is in the way"):
        fetch(f"{server.url}/c.txt", tmp_path, force=True, backoff=0)
    assert (tmp_path / "c.txt.part.json").read_bytes() == server.files["/c.txt.part.json"]
    assert "/c.txt" not in server.paths() and not (tmp_path / "c.txt").exists()


def test_a_part_file_replaced_since_its_record_is_not_taken(server: Server,
                                                            tmp_path: Path) -> None:
    server.files["/big.bin"] = BODY
    interrupted(server, tmp_path, "/big.bin", 30_000)
    (tmp_path / "other").write_bytes(b"x" * 30_000)
    os.replace(tmp_path / "other", tmp_path / "big.bin.part")  # same name and size, new file
    with pytest.raises(UserError, match="big.bin.part is in the way"):
        fetch(f"{server.url}/big.bin", tmp_path, backoff=0)
    assert (tmp_path / "big.bin.part").read_bytes() == b"x" * 30_000


def test_an_unfinished_download_is_not_taken_as_another_file(server: Server,
                                                             tmp_path: Path) -> None:
    """Fetching `x.part` (or `x.part.json`) while the download of `x` is unfinished neither
    reports that partial file as complete nor replaces it; `x` then finishes as usual."""
    server.files["/big.bin"] = BODY
    server.files["/big.bin.part"] = server.files["/big.bin.part.json"] = b"other\n"
    interrupted(server, tmp_path, "/big.bin", 30_000)
    for name in ("big.bin.part", "big.bin.part.json"):
        for force in (False, True):
            with pytest.raises(UserError, match="unfinished download of big.bin") as info:
                fetch(f"{server.url}/{name}", tmp_path, force=force, backoff=0)
            assert info.value.exit_code == EXIT_USAGE
    assert (tmp_path / "big.bin.part").stat().st_size == 30_000
    assert fetch(f"{server.url}/big.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert server.requests[-1][1]["Range"] == "bytes=30000-"
    assert fetch(f"{server.url}/big.bin.part", tmp_path, backoff=0).read_bytes() == b"other\n"


def test_downloads_that_share_temporary_names_share_a_lock(tmp_path: Path) -> None:
    for name in ("x", "x.part", "x.part.json", "x.bad", "x.part.part", "x.part.json.part"):
        assert fetch_mod._family(tmp_path / name) == tmp_path / "x"
    assert fetch_mod._family(tmp_path / ".part") == tmp_path / ".part"


# ---------------------------------------------------------------------------------------------
# Replies that are not the whole file


def test_a_206_to_a_plain_request_is_resumed_not_published(server: Server,
                                                           tmp_path: Path) -> None:
    server.files["/p.bin"] = BODY
    server.short_206["/p.bin"] = 1000
    assert fetch(f"{server.url}/p.bin", tmp_path, backoff=0).read_bytes() == BODY
    assert server.requests[1][1]["Range"] == "bytes=1000-"


def test_a_206_that_cannot_be_resumed_fails_in_one_line(server: Server, tmp_path: Path) -> None:
    server.files["/p.bin"] = BODY
    server.short_206["/p.bin"] = 1000
    server.no_validators.add("/p.bin")  # nothing vouches for the part: every try starts over
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/p.bin", tmp_path, retries=1, backoff=0)
    assert info.value.exit_code == EXIT_FAILURE and "\n" not in str(info.value)
    assert f"bytes 0-999 of {len(BODY)} only (HTTP 206)" in str(info.value)
    assert not (tmp_path / "p.bin").exists()


def test_an_encoded_reply_is_refused_not_saved(server: Server, tmp_path: Path) -> None:
    """Asked for the bytes as stored, a server that gzips anyway is refused: saving the
    compressed bytes under the plain name, or resuming them, would give a file that is not it."""
    server.files["/gz.txt"] = BODY
    server.gzip.add("/gz.txt")
    with pytest.raises(UserError) as info:
        fetch(f"{server.url}/gz.txt", tmp_path, backoff=0)
    assert info.value.exit_code == EXIT_FAILURE and "Content-Encoding: gzip" in str(info.value)
    assert server.requests[0][1]["Accept-Encoding"] == "identity"
    assert len(server.requests) == 1 and not [p for p in tmp_path.iterdir()]


# ---------------------------------------------------------------------------------------------
# hf:// folders and globs


def hf_dataset(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dataset o/n on the local server: sub/a.txt, listed by the Hub's tree API with its hash."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.files["/api/datasets/o/n/tree/main/sub?recursive=true"] = json.dumps(
        [{"type": "file", "path": "sub/a.txt", "size": len(BODY),
          "lfs": {"oid": sha(BODY)}}]).encode()
    server.files["/datasets/o/n/resolve/main/sub/a.txt"] = BODY


@pytest.mark.parametrize("source", ["hf://datasets/o/n/sub/*.txt", "hf://datasets/o/n/sub/"])
def test_sha256_with_a_folder_or_glob_is_refused_before_any_request(
        source: str, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_dataset(server, monkeypatch)
    result = run_cli("fetch", source, "-o", str(tmp_path), "--sha256", "0" * 64)
    assert_one_line_usage_error(result, "--sha256 checks one file")
    assert server.requests == [] and not any(tmp_path.iterdir())
    assert fetch(source, tmp_path, backoff=0) == tmp_path / "n" / "sub"
    assert (tmp_path / "n" / "sub" / "a.txt").read_bytes() == BODY


# ---------------------------------------------------------------------------------------------
# URLs beyond ASCII


def test_non_ascii_urls_are_percent_encoded(server: Server, tmp_path: Path) -> None:
    server.files["/%E6%97%A5%E6%9C%AC.txt?q=%C3%A9&x=%41"] = BODY
    path = fetch(f"{server.url}/日本.txt?q=é&x=%41#ü", tmp_path, backoff=0)
    assert path == tmp_path / "日本.txt" and path.read_bytes() == BODY
    assert resolve_url("https://bücher.example:8443/ü?ü=1")[0] == \
        "https://xn--bcher-kva.example:8443/%C3%BC?%C3%BC=1"
    with pytest.raises(UserError, match="not a valid international domain name") as info:
        fetch("http://a..ü/x.txt", tmp_path)
    assert info.value.exit_code == EXIT_USAGE


def test_sizes_that_round_alike_are_told_apart_in_bytes() -> None:
    assert fetch_mod._human_pair(107_950, 108_000) == ("107950 B", "108000 B")
    assert fetch_mod._human_pair(30_000, 102_400) == ("30.0 KB", "102.4 KB")
    with pytest.raises(fetch_mod._Retry, match="after 107950 B of 108000 B"):
        fetch_mod._check_complete(107_950, None, 108_000, 0, 0)


@pytest.mark.parametrize(("header", "waited", "said"), [
    ("7", 7.0, "retrying in 7.0 s (the server's Retry-After)"),
    ("86400", 300.0, "retrying in 300.0 s, the most llm waits (the "
                                         "server's Retry-After asked for 86400 s)"),
    (email.utils.formatdate(time.time() + 3600, usegmt=True), 300.0,
     "the server's Retry-After asked for"),
    ("soon", None, "retrying in 0.0 s"),  # unreadable: the usual backoff (0 here)
])
def test_a_503s_retry_after_is_honoured_up_to_a_limit(server: Server, tmp_path: Path, capsys,
                                                      monkeypatch, header, waited, said) -> None:
    """Retry-After on a 429/503 was ignored: llm came back after its own short backoff."""
    server.files["/busy.txt"] = BODY
    server.fail_times["/busy.txt"] = 1
    server.retry_after["/busy.txt"] = header
    slept: list[float] = []
    monkeypatch.setattr(fetch_mod.time, "sleep", slept.append)
    assert fetch(f"{server.url}/busy.txt", tmp_path, backoff=0).read_bytes() == BODY
    if waited is None:
        assert slept == [0.0]
    else:
        assert slept[0] == pytest.approx(waited, abs=2)
    assert said in " ".join(capsys.readouterr().err.split())


def test_a_file_of_the_same_name_from_another_source_is_not_taken_as_complete(
        server: Server, tmp_path: Path, capsys) -> None:
    """.../b/same.txt into the folder holding .../a/same.txt said "already complete", exit 0,
    and left the first URL's bytes; a file put there by hand was "complete" too."""
    server.files["/a/same.txt"] = b"first"
    server.files["/b/same.txt"] = b"second"
    first, second = f"{server.url}/a/same.txt", f"{server.url}/b/same.txt"
    fetch(first, tmp_path, backoff=0)
    fetch(first, tmp_path, backoff=0)  # the same source: complete, not downloaded again
    assert "same.txt is already complete; not downloading it again" in capsys.readouterr().err
    with pytest.raises(UserError) as info:
        fetch(second, tmp_path, backoff=0)
    assert str(info.value) == (f"{tmp_path / 'same.txt'} came from {first}, not {second}; use "
                               "another -o folder or --force to replace it")
    assert fetch(second, tmp_path, backoff=0, force=True).read_bytes() == b"second"
    fetch(second, tmp_path, backoff=0)  # the record followed the new file
    capsys.readouterr()
    (tmp_path / "same.txt").unlink()
    (tmp_path / "same.txt").write_bytes(b"by hand")  # the record is of another file now
    assert fetch(first, tmp_path, backoff=0).read_bytes() == b"by hand"
    assert (f"its record says it came from {second}, not {first} (the file has changed since"
            in " ".join(capsys.readouterr().err.split()))
    (tmp_path / ".same.txt.fetched.json").unlink()  # no record at all: kept, said honestly
    assert fetch(first, tmp_path, backoff=0).read_bytes() == b"by hand"
    assert "same.txt exists; not downloading it again (--force to redo)" in " ".join(
        capsys.readouterr().err.split())
    assert len(server.requests) == 2  # the first download and the forced one
