"""A tiny in-memory Hub for tests: just the endpoints huggingface_hub uses to push and download.

It serves create_repo, the README YAML check, preupload (every file is a
"regular" upload, so no LFS/xet transfer is involved), commit (NDJSON with
base64 file contents), repo info, the tree listing and file resolution
(HEAD + GET with the headers hf_hub_download reads), at a branch or at any
earlier commit sha. Bound to 127.0.0.1 on an
ephemeral port; nothing leaves the machine. Each request is logged so tests
can assert the real request flow happened.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files at that commit

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) at a branch name (every branch is the latest commit) or a commit sha."""
        if revision in self.history:
            return revision, self.history[revision]
        return None if len(revision) == 40 else (self.sha, self.files)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.env: dict[str, str] = {}  # what a subprocess needs to reach this Hub (set by the test fixture)
        self.authorizations: list[str | None] = []  # each request's Authorization header


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class _Handler(BaseHTTPRequestHandler):
    server_version = "TinyHub/1.0"
    state: HubState

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing -------------------------------------------------------------
    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.state.lock:
            self.state.requests.append((method, path))
            self.state.authorizations.append(self.headers.get("Authorization"))
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", lambda: self._json({})),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", self._info),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", self._tree),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                self.match = match
                return handler()
        self._json({"error": f"TinyHub does not serve {method} {path}"}, 404)

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _json(self, data, status: int = 200, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("X-Error-Message", data.get("error", ""))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _repo(self) -> Repo | None:
        return self.state.repos.get(self.match["repo"])

    def _revision(self) -> tuple[str, dict[str, bytes]] | None:
        """The requested repo at the requested revision, or None after answering 404."""
        repo = self._repo()
        if repo is None:
            self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return None
        found = repo.at(self.match["rev"])
        if found is None:
            self._json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
        return found

    # -- endpoints --------------------------------------------------------------
    def _create(self) -> None:
        body = json.loads(self._body())
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        self.state.repos[repo_id] = Repo()
        self._json({"url": url, "name": repo_id})

    def _preupload(self) -> None:
        files = json.loads(self._body())["files"]
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def _commit(self) -> None:
        repo = self._repo()
        if repo is None:
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        for line in self._body().decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        digest = hashlib.sha1()
        for path in sorted(repo.files):
            digest.update(path.encode() + hashlib.sha1(repo.files[path]).digest())
        repo.sha = digest.hexdigest()
        repo.history[repo.sha] = dict(repo.files)
        url = f"http://{self.headers['Host']}/{self.match['repo']}/commit/{repo.sha}"
        self._json({"commitUrl": url, "commitOid": repo.sha, "success": True})

    def _info(self) -> None:
        if (found := self._revision()) is None:
            return
        sha, files = found
        siblings = [{"rfilename": path} for path in sorted(files)]
        self._json({"id": self.match["repo"], "sha": sha, "siblings": siblings, "private": False})

    def _tree(self) -> None:
        if (found := self._revision()) is None:
            return
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in sorted(found[1].items())
        ]
        self._json(entries)

    def _resolve(self) -> None:
        if (found := self._revision()) is None:
            return
        sha, files = found
        data = files.get(self.match["file"])
        if data is None:
            return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)


def start_hub() -> tuple[ThreadingHTTPServer, HubState]:
    """Start the server on an ephemeral port in a daemon thread; ``server.shutdown()`` stops it."""
    state = HubState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
