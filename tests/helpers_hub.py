"""A fake Hugging Face Hub on 127.0.0.1 for `llm import` and `llm imagine` tests.

It serves the files of one local folder as repository OWNER/NAME (any id), and can answer each
file (matched by glob) or the model lookup otherwise: "stall" (never answers), "500", "401",
"403", "gated" (403 with X-Error-Code: GatedRepo, as the real Hub answers a gated file).
`hub.file_asked` is set once a file has been asked for.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "c0ffee" + "0" * 34
CODES = {"500": (500, None), "401": (401, None), "403": (403, None),
         "gated": (403, "GatedRepo")}


class FakeHub:
    def __init__(self, folder: Path, files: dict[str, str] | None = None,
                 api: str = "ok") -> None:
        self.folder, self.files, self.api = folder, files or {}, api
        self.file_asked = threading.Event()
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*")
                      if p.is_file())

    def tree(self) -> list[dict]:
        items = []
        for name in self.names():
            data = (self.folder / name).read_bytes()
            item = {"type": "file", "path": name, "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest()}
            if name.endswith(".safetensors"):
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                               "pointerSize": 130}
            items.append(item)
        return items

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        parts = request.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            if self.api != "ok":
                return self.refuse(request, self.api, body)
            if len(parts) > 4 and parts[4] == "tree":  # snapshot_download's file list
                return self.send(request, 200, json.dumps(self.tree()).encode(), {}, body)
            data = json.dumps({"id": "/".join(parts[2:4]), "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": n} for n in self.names()]}).encode()
            return self.send(request, 200, data, {}, body)
        if len(parts) < 5 or parts[2] != "resolve":
            return self.refuse(request, "404", body)
        name = "/".join(parts[4:])
        self.file_asked.set()
        mode = next((m for pattern, m in self.files.items() if fnmatch.fnmatch(name, pattern)),
                    "ok")
        if mode != "ok":
            return self.refuse(request, mode, body)
        path = self.folder / name
        if not path.is_file():
            return self.send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
        if name.endswith(".safetensors"):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        self.send(request, 200, data, headers, body)

    def refuse(self, request: BaseHTTPRequestHandler, mode: str, body: bool) -> None:
        if mode == "stall":
            self.release.wait(120)
            return
        status, code = CODES.get(mode, (404, "RepoNotFound"))
        self.send(request, status, b'{"error": "fake"}', {"X-Error-Code": code} if code else {},
                  body)

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, data: bytes,
             headers: dict[str, str], body: bool) -> None:
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)
