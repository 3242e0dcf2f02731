"""A small in-memory Hugging Face Hub for tests: the real `huggingface_hub` client (2.4) talks to it over HTTP
on 127.0.0.1 (stdlib only: http.server + threads).

What it speaks, as the client sends it (see huggingface_hub's hf_api.py, _commit_api.py, file_download.py,
_snapshot_download.py):
    GET    /api/whoami-v2
    GET    /api/agent-harnesses                       fetched by the client itself (user-agent detection)
    POST   /api/repos/create                          409 on an existing repo, still with {"url": ...}
    POST   /api/validate-yaml                         README front matter
    GET    /api/models/{repo}[/revision/{rev}]        model info: sha + siblings
    GET    /api/models/{repo}/refs                    branches (+ empty tags / converts / pullRequests)
    POST   /api/models/{repo}/branch/{branch}         branch name URL-encoded; {"startingPoint": rev}
    DELETE /api/models/{repo}/branch/{branch}
    POST   /api/models/{repo}/preupload/{rev}         always uploadMode "regular" (no LFS / Xet), + oid of
                                                      the file already there (the client drops unchanged files)
    POST   /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), deletedFile, deletedFolder
    GET    /api/models/{repo}/tree/{rev}[/{path}]     ?recursive=true
    POST   /api/models/{repo}/paths-info/{rev}        form: paths=..&expand=..
    GET    /api/models/{repo}/commits/{rev}           newest first
    HEAD   /{repo}/resolve/{rev}/{path}               X-Repo-Commit, ETag (git blob sha1), Content-Length; no body
    GET    /{repo}/resolve/{rev}/{path}               the bytes (Range: bytes=N- supported)
Repos hold real commits (parent, full file map) and branches. `FakeHub.fail_next("commit", n)` answers 500 to the
next n commit requests, optionally after letting some through (fault injection); `requests` logs
(method, endpoint kind) of every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in self.branches:
            return self.commits[self.branches[revision[len("refs/heads/"):]]]
        return self.commits.get(revision)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """State of the fake Hub, shared by the request threads (one lock)."""

    def __init__(self, token: str | None = None):
        self.token = token  # when set, other tokens get 401
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[str] = []
        self.tokens_seen: set[str] = set()
        self._failures: dict[str, list] = {}
        self._counter = 0
        self.url = ""

    # ---- test controls ------------------------------------------------------------------------------
    def fail_next(self, kind: str, count: int, status: int = 500, after: int = 0) -> None:
        """Answer `status` to the next `count` requests of `kind` ("commit", "preupload", "create_branch", ...),
        once `after` more of them went through normally."""
        with self.lock:
            self._failures[kind] = [count, status, after]

    def count(self, kind: str, method: str | None = None) -> int:
        return sum(1 for m, k in self.requests if k == kind and (method is None or m == method))

    def commit_total(self, repo_id: str) -> int:
        """Commits in the repo, the initial one included."""
        return len(self.repos[repo_id].commits)

    def files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    # ---- state changes ------------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(json.dumps([repo.repo_id, parent, title, self._counter,
                                          sorted((p, git_blob_sha1(d)) for p, d in files.items())]).encode())
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        commit = Commit(digest.hexdigest(), parent, files, title, message, now)
        repo.commits[commit.id] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = Repo(repo_id, private)
            initial = self._new_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit", "")
            repo.branches["main"] = initial.id
            self.repos[repo_id] = repo
            return True

    def _take_failure(self, kind: str) -> int | None:
        with self.lock:
            pending = self._failures.get(kind)
            if pending and pending[2] > 0:
                pending[2] -= 1
            elif pending and pending[0] > 0:
                pending[0] -= 1
                return pending[1]
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/0.1"
    hub: FakeHub  # set on the subclass made by `serve`

    def log_message(self, format, *args):  # quiet
        pass

    # ---- plumbing -----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _auth(self, required: bool) -> str | None:
        header = self.headers.get("Authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        if token:
            self.hub.tokens_seen.add(token)
        if token and self.hub.token is not None and token != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        if required and not token:
            raise HubError(401, "You must be authenticated to do this")
        return token

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if repo.private and not self.headers.get("Authorization"):
            raise HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = url.path.split("/")[1:]
        query = parse_qs(url.query)
        kind = "unknown"
        try:
            kind, handler, args = self._route(method, segments)
            with self.hub.lock:
                self.hub.requests.append((method, kind))
            failure = self.hub._take_failure(kind)
            if failure is not None:
                self._body()
                raise HubError(failure, f"injected failure ({kind})")
            handler(*args, query=query)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json(err.status, {"error": err.message}, headers)
        except Exception as err:  # a bug in the fake: make it visible in the client's error
            self._json(500, {"error": f"fake hub: {type(err).__name__}: {err}"})
            raise

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- routing ------------------------------------------------------------------------------------
    def _route(self, method: str, seg: list[str]):
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return "whoami", self.whoami, ()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return "create_repo", self.create_repo, ()
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate_yaml", self.validate_yaml, ()
        if seg[:2] == ["api", "agent-harnesses"] and method == "GET":  # the client's user-agent telemetry
            return "agent_harnesses", self.agent_harnesses, ()
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id = f"{unquote(seg[2])}/{unquote(seg[3])}"
            rest = seg[4:]
            if not rest and method == "GET":
                return "model_info", self.model_info, (repo_id, "main")
            action = rest[0]
            arg = unquote(rest[1]) if len(rest) > 1 else None
            if action == "revision" and arg is not None and method == "GET":
                return "model_info", self.model_info, (repo_id, arg)
            if action == "refs" and method == "GET":
                return "refs", self.refs, (repo_id,)
            if action == "branch" and arg is not None and method == "POST":
                return "create_branch", self.create_branch, (repo_id, arg)
            if action == "branch" and arg is not None and method == "DELETE":
                return "delete_branch", self.delete_branch, (repo_id, arg)
            if action == "preupload" and arg is not None and method == "POST":
                return "preupload", self.preupload, (repo_id, arg)
            if action == "commit" and arg is not None and method == "POST":
                return "commit", self.commit, (repo_id, arg)
            if action == "tree" and arg is not None and method == "GET":
                path = "/".join(unquote(s) for s in rest[2:])
                return "tree", self.tree, (repo_id, arg, path)
            if action == "paths-info" and arg is not None and method == "POST":
                return "paths_info", self.paths_info, (repo_id, arg)
            if action == "commits" and arg is not None and method == "GET":
                return "commits", self.commits, (repo_id, arg)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            path = "/".join(unquote(s) for s in seg[4:])
            return "resolve", self.resolve, (repo_id, unquote(seg[3]), path)
        self.hub.unhandled.append(f"{method} {self.path}")
        raise HubError(404, f"fake hub: no route for {method} {self.path}")

    # ---- endpoints ----------------------------------------------------------------------------------
    def whoami(self, query):
        self._auth(required=True)
        self._json(200, {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User", "email": None,
                         "orgs": [], "auth": {"type": "access_token",
                                              "accessToken": {"displayName": "fake", "role": "write"}}})

    def agent_harnesses(self, query):
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, query):
        self._auth(required=True)
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "fake hub: only model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        created = self.hub.create_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        url = f"{self.hub.url}/{repo_id}"
        if not created:
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, query):
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append("metadata block is not closed")
            else:
                try:
                    metadata = yaml.safe_load(content[3:end])
                except yaml.YAMLError as err:
                    errors.append(f"invalid YAML: {err}")
                else:
                    if metadata is not None and not isinstance(metadata, dict):
                        errors.append("metadata must be a mapping")
        if errors:
            self._json(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        else:
            self._json(200, {"errors": [], "warnings": []})

    def model_info(self, repo_id, revision, query):
        self._auth(required=False)
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            siblings = [{"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)}
                        for p, d in sorted(commit.files.items())]
            self._json(200, {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                             "sha": commit.id, "lastModified": commit.date, "createdAt": commit.date,
                             "private": repo.private, "disabled": False, "gated": False, "downloads": 0,
                             "likes": 0, "tags": [], "library_name": None, "siblings": siblings})

    def refs(self, repo_id, query):
        self._auth(required=False)
        with self.hub.lock:
            repo = self._repo(repo_id)
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                        for name, sha in sorted(repo.branches.items())]
        self._json(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def create_branch(self, repo_id, branch, query):
        self._auth(required=True)
        payload = json.loads(self._body() or b"{}")
        with self.hub.lock:
            repo = self._repo(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.id
        self._json(200, {})

    def delete_branch(self, repo_id, branch, query):
        self._auth(required=True)
        with self.hub.lock:
            repo = self._repo(repo_id)
            if branch not in repo.branches or branch == "main":
                raise HubError(404 if branch != "main" else 403, f"cannot delete branch {branch}")
            del repo.branches[branch]
        self._json(200, {})

    def preupload(self, repo_id, revision, query):
        self._auth(required=True)
        payload = json.loads(self._body() or b"{}")
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            files = []
            for item in payload.get("files", []):
                entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
                if item["path"] in commit.files:
                    entry["oid"] = git_blob_sha1(commit.files[item["path"]])
                files.append(entry)
        self._json(200, {"files": files, "commitOid": commit.id})

    def commit(self, repo_id, revision, query):
        self._auth(required=True)
        body = self._body()
        if query.get("create_pr"):
            raise HubError(400, "fake hub: pull requests are not supported")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the header")
        header = lines[0]["value"]
        with self.hub.lock:
            repo = self._repo(repo_id)
            if revision not in repo.branches:
                raise HubError(404 if repo.resolve(revision) is None else 400,
                               f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent and not head.id.startswith(parent):
                raise HubError(412, f"parent commit {parent} is not the head of {revision}")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:  # lfsFile: this fake never asks for LFS uploads
                    raise HubError(400, f"fake hub: unsupported commit entry {key!r}")
            commit = self.hub._new_commit(repo, head.id, files, header.get("summary", ""),
                                          header.get("description", ""))
            repo.branches[revision] = commit.id
        self._json(200, {"success": True, "commitOid": commit.id,
                         "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.id}",
                         "hookOutput": "", "pullRequestUrl": None})

    @staticmethod
    def _entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                folders.add(base + "/".join(parts[:depth]))
            if len(parts) == 1 or recursive:
                entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
        for folder in sorted(folders):
            inner = sorted((p, git_blob_sha1(d)) for p, d in files.items() if p.startswith(folder + "/"))
            entries.append({"type": "directory", "oid": hashlib.sha1(json.dumps(inner).encode()).hexdigest(),
                            "size": 0, "path": folder})
        return entries

    def tree(self, repo_id, revision, path, query):
        self._auth(required=False)
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        with self.hub.lock:
            commit = self._commit(self._repo(repo_id), revision)
            inside = any(p.startswith(path.rstrip("/") + "/") for p in commit.files)
            if path and path not in commit.files and not inside:
                raise HubError(404, f"{path} does not exist", "EntryNotFound")
            entries = self._entries(commit.files, path, recursive)
        self._json(200, entries)

    def paths_info(self, repo_id, revision, query):
        self._auth(required=False)
        form = parse_qs(self._body().decode())
        wanted = form.get("paths", [])
        with self.hub.lock:
            commit = self._commit(self._repo(repo_id), revision)
            everything = {e["path"]: e for e in self._entries(commit.files, "", recursive=True)}
        self._json(200, [everything[p] for p in wanted if p in everything])

    def commits(self, repo_id, revision, query):
        self._auth(required=False)
        items = []
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            while commit is not None:
                items.append({"id": commit.id, "title": commit.title, "message": commit.message,
                              "authors": [{"user": USER, "avatar": ""}], "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, items)

    def resolve(self, repo_id, revision, path, query):
        self._auth(required=False)
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        status, body = 200, data
        range_header = self.headers.get("Range", "")
        if self.command == "GET" and range_header.startswith("bytes="):
            start = int(range_header[len("bytes="):].split("-")[0] or 0)
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream")


class FakeHubServer:
    """Runs a FakeHub on 127.0.0.1:<free port> in a daemon thread; use as a context manager."""

    def __init__(self, token: str | None = None):
        self.hub = FakeHub(token)
        handler = type("BoundHandler", (Handler,), {"hub": self.hub})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.hub.url = self.url
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def use_fake_hub(monkeypatch, url: str, cache_dir, token: str) -> None:
    """Points huggingface_hub (and what reads its settings: peft, transformers, micl) at `url`.

    HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE are read once when huggingface_hub is imported, so the module
    constants (and the endpoint of the module-level HfApi behind `huggingface_hub.file_exists` & co) are patched
    as well as the environment."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # module-level helpers (huggingface_hub.file_exists, used by peft, ...) are methods of an HfApi() made at import
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(cache_dir).parent / "no_login_token"))  # not ~/.cache
    # the client fetches {ENDPOINT}/api/agent-harnesses once a day for its user agent and caches it in HF_HOME
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(Path(cache_dir).parent / "agent_harnesses.json"))


if __name__ == "__main__":  # manual poking: python tests/hub_server.py
    with FakeHubServer() as server:
        print(f"fake hub on {server.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
