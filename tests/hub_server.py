"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

The server speaks enough of the Hub protocol for the *real* ``huggingface_hub`` client (``HfApi``,
``hf_hub_download``, ``snapshot_download``, ``upload_file``/``upload_folder``) and for ``transformers``'
``push_to_hub`` / ``from_pretrained(repo_id)`` to work against it, entirely on 127.0.0.1.

Usage in a test module (``tests/`` is on ``sys.path`` under pytest's default "prepend" import mode)::

    import hub_server
    import pytest

    @pytest.fixture
    def local_hub(monkeypatch, tmp_path):
        yield from hub_server.local_hub_fixture(monkeypatch, tmp_path)

    def test_push(local_hub):
        model.push_to_hub("user/tiny")            # goes to the local server
        assert "model.safetensors" in local_hub.repo_files("user/tiny")
        BertModel.from_pretrained("user/tiny")    # downloaded from it, into a fresh tmp HF_HOME

(``from hub_server import local_hub`` also registers the ready-made fixture, but ruff then reports F401 on
the import and F811 on every test argument named ``local_hub``.)

or, without the fixture (no client patching, pass the endpoint explicitly)::

    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)

Storage: one folder per repo under ``<root>/repos/<type>s/<namespace>/<name>`` holding the files of the
``main`` branch at their paths, a content-addressed blob store under ``<root>/blobs`` and, in memory, a
commit history per repo (40-hex commit oids, parent links, one manifest per commit) so that any past
commit can still be served.

Uploads: the ``preupload`` endpoint answers ``uploadMode: "regular"`` for every file, so the client
sends all contents base64-encoded inline in the ``commit`` ndjson payload: no LFS, no Xet, whatever
the file size. ``LocalHub(lfs_threshold=N)`` instead answers ``"lfs"`` for files of at least N bytes,
which exercises the (implemented) LFS batch API; since ``huggingface_hub`` then prefers Xet when
``hf_xet`` is installed, this requires ``HF_HUB_DISABLE_XET`` (``use_local_hub`` sets it for you).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_local_test_token"
DEFAULT_USER = "user"

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_CHUNK = 1 << 20


def _now() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _Entry:
    """One file of a commit manifest."""

    sha256: str
    size: int
    git_oid: str  # git blob oid of the content (regular) or of the LFS pointer (lfs)
    lfs: bool = False

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Entry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str]  # "main", other branches, "refs/pr/N" -> commit oid
    commits: dict[str, _Commit]
    counter: int = 0
    pull_requests: dict[int, tuple[str, str]] = field(default_factory=dict)  # number -> (title, creation date)


class HubError(Exception):
    """Raised inside handlers to produce an error response the client knows how to parse."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: LocalHub):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Close idle keep-alive connections so that handler threads exit promptly."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class LocalHub:
    """In-process Hub-compatible server bound to 127.0.0.1 on a random free port."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        lfs_threshold: int | None = None,
        tree_page_size: int = 1000,
        verbose: bool = False,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="local_hub_")) if root is None else Path(root)
        self.token = token
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.verbose = verbose
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection / seeding helpers

    def _get_repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on the local hub")
        return repo

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Sorted paths of the files of ``repo_id`` at ``revision`` (a branch or a commit oid)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """Folder holding the files of the ``main`` branch at their paths."""
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            entry = repo.commits[self._resolve(repo, revision)].files[path]
        return self._blob_path(entry.sha256).read_bytes()

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        """Commit oid that ``revision`` points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_id, repo_type), revision)

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Commit oids reachable from ``revision``, newest first (the initial commit is last)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return [c.oid for c in self._history(repo, self._resolve(repo, revision))]

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo server-side (same initial ``.gitattributes`` commit as the Hub)."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id!r} already exists")
            repo = _Repo(repo_type, repo_id, private, _now(), refs={}, commits={})
            self._repos[(repo_type, repo_id)] = repo
            self.repo_dir(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
            initial = {".gitattributes": self._store_bytes(_GITATTRIBUTES)}
            self._commit(repo, "main", initial, "initial commit", "")

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike],
        *,
        repo_type: str = "model",
        message: str = "Seed files",
        create: bool = True,
    ) -> str:
        """Seed a repo server-side, without going through the client. Returns the new commit oid."""
        with self._lock:
            if create and (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_id, repo_type)
            repo = self._get_repo(repo_id, repo_type)
            new_files = dict(repo.commits[repo.refs["main"]].files)
            for path, content in files.items():
                if isinstance(content, str):
                    content = content.encode()
                elif not isinstance(content, bytes):
                    content = Path(content).read_bytes()
                new_files[_clean_path(path)] = self._store_bytes(content)
            return self._commit(repo, "main", new_files, message, "")

    # ------------------------------------------------------------------ storage internals (hold self._lock)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store_bytes(self, data: bytes, lfs: bool = False) -> _Entry:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        git_oid = _git_blob_oid(_lfs_pointer(sha256, len(data)) if lfs else data)
        return _Entry(sha256=sha256, size=len(data), git_oid=git_oid, lfs=lfs)

    def _resolve(self, repo: _Repo, revision: str | None) -> str:
        rev = revision or "main"
        if rev in repo.refs:
            return repo.refs[rev]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/") :] in repo.refs:
            return repo.refs[rev[len("refs/heads/") :]]
        if rev in repo.commits:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _open_pull_request(self, repo: _Repo, title: str, base: str) -> int:
        """Number of a new pull request whose ref ``refs/pr/N`` starts at commit ``base``."""
        number = len(repo.pull_requests) + 1
        repo.pull_requests[number] = (title, _now())
        repo.refs[f"refs/pr/{number}"] = base
        return number

    def _history(self, repo: _Repo, oid: str) -> list[_Commit]:
        out = []
        current: str | None = oid
        while current is not None:
            commit = repo.commits[current]
            out.append(commit)
            current = commit.parent
        return out

    def _commit(self, repo: _Repo, ref: str, files: dict[str, _Entry], title: str, message: str) -> str:
        parent = repo.refs.get(ref)
        repo.counter += 1
        manifest = "\n".join(f"{p}\0{e.git_oid}" for p, e in sorted(files.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\n{repo.counter}\n{parent}\n{title}\n{message}\n{manifest}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = _Commit(oid, parent, title, message, _now(), dict(files))
        repo.refs[ref] = oid
        if ref == "main":
            old = repo.commits[parent].files if parent is not None else {}
            self._sync_worktree(repo, old, files)
        return oid

    def _sync_worktree(self, repo: _Repo, old: dict[str, _Entry], new: dict[str, _Entry]) -> None:
        base = self.repo_dir(repo.repo_id, repo.repo_type)
        for path, entry in old.items():
            if new.get(path) != entry:
                with contextlib.suppress(FileNotFoundError):
                    (base / path).unlink()
        for path, entry in new.items():
            target = base / path
            if old.get(path) == entry and target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._blob_path(entry.sha256), target)
            except OSError:
                shutil.copyfile(self._blob_path(entry.sha256), target)

    # ------------------------------------------------------------------ URL helpers

    def repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"


def _clean_path(path: str) -> str:
    clean = path.replace("\\", "/").strip("/")
    parts = clean.split("/")
    if not clean or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}", "BadRequest")
    return clean


def _tree_listing(files: dict[str, _Entry], base: str, recursive: bool) -> tuple[list[str], list[str]] | None:
    """(directories, files) under ``base``, or None if ``base`` is not a directory of the tree."""
    base = base.strip("/")
    prefix = f"{base}/" if base else ""
    dirs: set[str] = set()
    out_files: list[str] = []
    for path in files:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if recursive:
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            out_files.append(path)
        elif len(parts) == 1:
            out_files.append(path)
        else:
            dirs.add(prefix + parts[0])
    if base and not dirs and not out_files:
        return None
    return sorted(dirs), sorted(out_files)


def _folder_oid(files: dict[str, _Entry], folder: str) -> str:
    prefix = folder.rstrip("/") + "/"
    content = "\n".join(f"{p}\0{e.git_oid}" for p, e in sorted(files.items()) if p.startswith(prefix))
    return hashlib.sha1(f"tree {folder}\n{content}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    # -------------------------------------------------------------- plumbing

    def log_message(self, format, *args):  # noqa: A002 - signature imposed by BaseHTTPRequestHandler
        if self.server.hub.verbose:
            sys.stderr.write("[LocalHub] " + (format % args) + "\n")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers, "application/json; charset=utf-8")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s != ""]
        with hub._lock:
            hub.requests.append((method, unquote(split.path)))
        try:
            self.body = self._read_body()
            self.query = parse_qs(split.query, keep_blank_values=True)
            handled = self._route(method, raw_segments)
            if not handled:
                with hub._lock:
                    hub.unhandled.append((method, unquote(split.path)))
                sys.stderr.write(f"[LocalHub] unhandled request: {method} {self.path}\n")
                self._json(404, {"error": f"LocalHub does not implement {method} {split.path}"})
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - surfaced to the client as a 500
            traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(Exception):
                self._json(500, {"error": f"LocalHub internal error: {e!r}"})

    # -------------------------------------------------------------- auth

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _require_auth(self) -> str:
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated to access this resource")
        if token != self.server.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.server.hub.user

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> _Repo:
        hub = self.server.hub
        if write:
            self._require_auth()
        repo = hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._token() != hub.token):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    # -------------------------------------------------------------- routing

    def _route(self, method: str, segs: list[str]) -> bool:
        if not segs:
            return False
        if segs[0] == "api":
            return self._route_api(method, segs[1:])
        if segs[0] == "_lfs" and len(segs) == 2 and method == "PUT":
            self._lfs_put(unquote(segs[1]))
            return True
        # Web URLs: [datasets|spaces|kernels/]ns/name/(resolve/<rev>/<path> | .git/info/lfs/...)
        repo_type = "model"
        if segs[0] in ("datasets", "spaces", "kernels") and len(segs) >= 3:
            repo_type, segs = _TYPE_FROM_PLURAL[segs[0]], segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
            revision = unquote(segs[3])
            path = "/".join(unquote(s) for s in segs[4:])
            self._resolve_file(repo_type, repo_id, revision, path)
            return True
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                self._lfs_batch(repo_type, f"{unquote(segs[0])}/{unquote(segs[1])[: -len('.git')]}")
                return True
        return False

    def _route_api(self, method: str, segs: list[str]) -> bool:
        if segs == ["whoami-v2"] and method == "GET":
            self._whoami()
        elif segs == ["repos", "create"] and method == "POST":
            self._create_repo()
        elif segs == ["repos", "delete"] and method == "DELETE":
            self._delete_repo()
        elif segs == ["validate-yaml"] and method == "POST":
            self._json(200, {"errors": [], "warnings": []})
        elif len(segs) >= 3 and segs[0] in _TYPE_FROM_PLURAL:
            repo_type = _TYPE_FROM_PLURAL[segs[0]]
            repo_id = f"{unquote(segs[1])}/{unquote(segs[2])}"
            rest = segs[3:]
            action = rest[0] if rest else None
            arg = unquote(rest[1]) if len(rest) > 1 else None
            if action is None and method == "GET":
                self._repo_info(repo_type, repo_id, None)
            elif action == "revision" and arg is not None and method == "GET":
                self._repo_info(repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
            elif action == "tree" and arg is not None and method == "GET":
                self._tree(repo_type, repo_id, arg, "/".join(unquote(s) for s in rest[2:]))
            elif action == "paths-info" and arg is not None and method == "POST":
                self._paths_info(repo_type, repo_id, arg)
            elif action == "preupload" and arg is not None and method == "POST":
                self._preupload(repo_type, repo_id, arg)
            elif action == "commit" and arg is not None and method == "POST":
                self._commit(repo_type, repo_id, arg)
            elif action == "branch" and arg is not None and method in ("POST", "DELETE"):
                self._branch(method, repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
            elif action == "refs" and len(rest) == 1 and method == "GET":
                self._refs(repo_type, repo_id)
            elif action == "commits" and arg is not None and method == "GET":
                self._list_commits(repo_type, repo_id, arg)
            elif action == "discussions" and arg is None and method == "POST":
                self._create_pull_request(repo_type, repo_id)
            elif action == "discussions" and arg is not None and arg.isdigit() and method == "GET":
                self._pull_request(repo_type, repo_id, int(arg))
            else:
                return False
        else:
            return False
        return True

    # -------------------------------------------------------------- account / repos

    def _whoami(self) -> None:
        user = self._require_auth()
        self._json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": "Local Test User",
                "email": f"{user}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-test", "role": "write"},
                },
            },
        )

    def _repo_key_from_payload(self) -> tuple[str, str]:
        payload = json.loads(self.body or b"{}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name", "BadRequest")
        namespace = payload.get("organization") or self.server.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}", "BadRequest")
        return repo_type, f"{namespace}/{name}"

    def _create_repo(self) -> None:
        hub = self.server.hub
        self._require_auth()
        payload = json.loads(self.body or b"{}")
        repo_type, repo_id = self._repo_key_from_payload()
        private = payload.get("visibility") in ("private", "protected") or bool(payload.get("private"))
        with hub._lock:
            existing = hub._repos.get((repo_type, repo_id))
            if existing is not None:
                raise_url = hub.repo_url(existing)
                self._json(
                    409,
                    {"error": f"You already created this {repo_type} repo", "url": raise_url},
                    {"X-Error-Message": f"You already created this {repo_type} repo"},
                )
                return
            hub.create_repo(repo_id, repo_type, private=private)
            repo = hub._repos[(repo_type, repo_id)]
            self._json(200, {"url": hub.repo_url(repo), "name": repo_id, "id": repo.refs["main"][:24]})

    def _delete_repo(self) -> None:
        hub = self.server.hub
        self._require_auth()
        repo_type, repo_id = self._repo_key_from_payload()
        with hub._lock:
            if hub._repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            shutil.rmtree(hub.repo_dir(repo_id, repo_type), ignore_errors=True)
        self._json(200, {})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = repo.commits[hub._resolve(repo, revision)]
            with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=entry.size, blobId=entry.git_oid)
                    if entry.lfs:
                        sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
                siblings.append(sibling)
            namespace = repo_id.split("/")[0]
            info = {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": namespace,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
            if repo_type == "model":
                info["modelId"] = repo_id
        self._json(200, info)

    # -------------------------------------------------------------- tree / paths-info / refs / commits

    def _last_commit(self, repo: _Repo, head: str, path: str, is_dir: bool) -> dict:
        def snapshot(commit: _Commit):
            if not is_dir:
                return commit.files.get(path)
            prefix = path + "/"
            return {p: e for p, e in commit.files.items() if p.startswith(prefix)}

        history = self.server.hub._history(repo, head)
        found = history[-1]
        for commit, parent in zip(history, history[1:], strict=False):
            if snapshot(commit) != snapshot(parent):
                found = commit
                break
        return {"id": found.oid, "title": found.title, "date": found.date}

    def _entries(self, repo: _Repo, head: str, dirs: list[str], files: list[str], expand: bool) -> list[dict]:
        commit = repo.commits[head]
        out: list[dict] = []
        for d in dirs:
            item: dict = {"type": "directory", "oid": _folder_oid(commit.files, d), "size": 0, "path": d}
            if expand:
                item["lastCommit"] = self._last_commit(repo, head, d, True)
            out.append(item)
        for f in files:
            entry = commit.files[f]
            item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": f}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            if expand:
                item["lastCommit"] = self._last_commit(repo, head, f, False)
            out.append(item)
        return out

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.server.hub
        recursive, expand = self._flag("recursive"), self._flag("expand")
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            head = hub._resolve(repo, revision)
            listing = _tree_listing(repo.commits[head].files, path, recursive)
            if listing is None:
                raise HubError(404, f"{path} does not exist on {revision!r}", "EntryNotFound")
            dirs, files = listing
            page_size = 50 if expand else hub.tree_page_size
            cursor = int(self.query.get("cursor", ["0"])[0] or 0)
            items = [("d", d) for d in dirs] + [("f", f) for f in files]
            page = items[cursor : cursor + page_size]
            entries = self._entries(
                repo, head, [p for k, p in page if k == "d"], [p for k, p in page if k == "f"], expand
            )
        headers = {}
        if cursor + page_size < len(items):
            tree_path = f"/{quote(path)}" if path else ""
            next_url = (
                f"{hub.endpoint}/api/{repo_type}s/{repo_id}/tree/{quote(revision, safe='')}{tree_path}"
                f"?recursive={str(recursive).lower()}&expand={str(expand).lower()}"
                f"&cursor={cursor + page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(200, entries, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = json.loads(self.body or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            head = hub._resolve(repo, revision)
            files = repo.commits[head].files
            dirs_out, files_out = [], []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    files_out.append(p)
                elif p and any(f.startswith(p + "/") for f in files):
                    dirs_out.append(p)
            entries = self._entries(repo, head, dirs_out, files_out, expand)
        self._json(200, entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.refs.items())
                if not name.startswith("refs/")
            ]
            prs = [
                {"name": name, "ref": name, "targetCommit": oid}
                for name, oid in sorted(repo.refs.items())
                if name.startswith("refs/pr/")
            ]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            history = hub._history(repo, hub._resolve(repo, revision))
            out = [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": hub.user, "avatar": ""}],
                    "date": c.date,
                }
                for c in history
            ]
        self._json(200, out)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            if method == "DELETE":
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                if repo.refs.pop(branch, None) is None:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                self._json(200, {})
                return
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            payload = json.loads(self.body or b"{}")
            repo.refs[branch] = hub._resolve(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    # -------------------------------------------------------------- pull requests (no other discussions)

    def _create_pull_request(self, repo_type: str, repo_id: str) -> None:
        """``HfApi.create_pull_request``, which ``upload_folder(create_pr=True)`` calls before committing to its ref."""
        hub = self.server.hub
        payload = json.loads(self.body or b"{}")
        if not payload.get("pullRequest"):
            raise HubError(400, "LocalHub opens pull requests, not discussions", "BadRequest")
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            number = hub._open_pull_request(repo, payload.get("title") or "", hub._resolve(repo, "main"))
            url = hub.repo_url(repo)
        self._json(200, {"num": number, "url": f"{url}/discussions/{number}"})

    def _pull_request(self, repo_type: str, repo_id: str, number: int) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            if number not in repo.pull_requests:
                raise HubError(404, f"Discussion {number} does not exist on {repo_id}", "EntryNotFound")
            title, created_at = repo.pull_requests[number]
        details = {
            "num": number,
            "title": title,
            "status": "draft",
            "isPullRequest": True,
            "createdAt": created_at,
            "author": {"name": hub.user},
            "repo": {"name": repo_id, "type": repo_type},
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
        }
        self._json(200, details)

    # -------------------------------------------------------------- uploads

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        payload = json.loads(self.body or b"{}")
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
            try:
                files = repo.commits[hub._resolve(repo, revision)].files
            except HubError:
                if not create_pr:
                    raise
                files = {}
            out = []
            for item in payload.get("files", []):
                path = item["path"]
                lfs = hub.lfs_threshold is not None and int(item.get("size") or 0) >= hub.lfs_threshold
                existing = files.get(path)
                oid = None if existing is None else (existing.sha256 if lfs else existing.git_oid)
                mode = "lfs" if lfs else "regular"
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            head = repo.refs.get("main")
        self._json(200, {"files": out, "commitOid": head})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line", "BadRequest")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        # Decode and store the file contents before taking the lock (they can be large).
        ops: list[tuple[str, str, _Entry | None]] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                raw = value.get("content", "")
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                with hub._lock:
                    entry = hub._store_bytes(data)
                ops.append(("add", _clean_path(value["path"]), entry))
            elif key == "lfsFile":
                sha256 = value.get("oid", "")
                blob = hub._blob_path(sha256)
                if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not blob.exists():
                    raise HubError(422, f"LFS object {sha256} was not uploaded", "BadRequest")
                size = blob.stat().st_size
                git_oid = _git_blob_oid(_lfs_pointer(sha256, size))
                ops.append(("add", _clean_path(value["path"]), _Entry(sha256, size, git_oid, lfs=True)))
            elif key == "deletedFile":
                ops.append(("delete", _clean_path(value["path"]), None))
            elif key == "deletedFolder":
                ops.append(("delete_folder", _clean_path(value["path"]), None))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}", "BadRequest")

        with hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            pr_num = None
            if create_pr:
                pr_num = hub._open_pull_request(repo, header.get("summary") or "", hub._resolve(repo, revision))
                ref = f"refs/pr/{pr_num}"
            else:
                ref = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
                if ref not in repo.refs:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            current = repo.refs[ref]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != current:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[current].files)
            for kind, path, entry in ops:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            oid = hub._commit(repo, ref, files, header.get("summary") or "", header.get("description") or "")
            url = hub.repo_url(repo)
        self._json(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{url}/commit/{oid}",
                "hookOutput": "",
                "pullRequestUrl": f"{url}/discussions/{pr_num}" if pr_num is not None else None,
            },
        )

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.server.hub
        payload = json.loads(self.body or b"{}")
        with hub._lock:
            self._get_repo(repo_type, repo_id, write=True)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if not hub._blob_path(oid).exists():
                item["actions"] = {"upload": {"href": f"{hub.endpoint}/_lfs/{oid}", "header": {}}}
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str) -> None:
        hub = self.server.hub
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "LFS object content does not match its oid", "BadRequest")
        with hub._lock:
            hub._store_bytes(self.body)
        self._send(200)

    # -------------------------------------------------------------- downloads

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = hub._resolve(repo, revision)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and entry.size > 0:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if match is None or match.groups() == ("", ""):
                raise HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{entry.size}"})
            first, last = match.groups()
            if first == "":
                start = max(entry.size - int(last), 0)
            else:
                start = int(first)
                end = min(int(last), entry.size - 1) if last else entry.size - 1
            if start >= entry.size or start > end:
                unsatisfiable = {"Content-Range": f"bytes */{entry.size}"}
                raise HubError(416, "Range not satisfiable", headers=unsatisfiable)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with open(hub._blob_path(entry.sha256), "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


# ---------------------------------------------------------------------- client-side patching


@contextlib.contextmanager
def use_local_hub(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: str | os.PathLike,
    *,
    hub: LocalHub | None = None,
    disable_xet: bool | None = None,
) -> Iterator[LocalHub]:
    """Start ``hub`` (a new ``LocalHub`` by default) and point huggingface_hub/transformers at it, in-process.

    ``huggingface_hub`` reads its environment once, at import time, into ``huggingface_hub.constants`` (and a
    few module-level copies), so setting environment variables is not enough: this patches the constants,
    the module-level ``HfApi`` behind ``huggingface_hub.upload_file`` & co., and transformers' cached
    ``HfApi`` (``transformers.utils.hub._hf_api``). Everything is restored by ``monkeypatch`` afterwards and
    the shared HTTP client is closed so no connection to the stopped server is reused.

    Offline mode (``HF_HUB_OFFLINE``) is switched off for the duration, caches go to ``tmp_path/hf_home``.
    ``disable_xet`` (default: only when ``hub.lfs_threshold`` is set) sets ``HF_HUB_DISABLE_XET``.
    """
    import huggingface_hub
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = hub if hub is not None else LocalHub(Path(tmp_path) / "local_hub_storage")
    if disable_xet is None:
        disable_xet = hub.lfs_threshold is not None
    hub.start()
    try:
        endpoint = hub.endpoint
        hf_home = Path(tmp_path) / "hf_home"
        hf_home.mkdir(parents=True, exist_ok=True)
        hub_cache = str(hf_home / "hub")
        assets_cache = str(hf_home / "assets")
        token_path = str(hf_home / "token")

        # Environment (for anything reading it lazily, and for subprocesses).
        for key, value in {
            "HF_ENDPOINT": endpoint,
            "HF_TOKEN": hub.token,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": assets_cache,
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN_PATH": token_path,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        }.items():
            monkeypatch.setenv(key, value)
        for key in ("TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        for key in ("HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        if disable_xet:
            monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")

        # Constants read at import time.
        patched = {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(hf_home),
            "default_cache_path": hub_cache,
            "default_assets_cache_path": assets_cache,
            "HUGGINGFACE_HUB_CACHE": hub_cache,
            "HUGGINGFACE_ASSETS_CACHE": assets_cache,
            "HF_HUB_CACHE": hub_cache,
            "HF_ASSETS_CACHE": assets_cache,
            "HF_TOKEN_PATH": token_path,
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "default_xet_cache_path": str(hf_home / "xet"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_UPDATE_CHECK": True,
            "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
            "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
            "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        }
        if disable_xet:
            patched["HF_HUB_DISABLE_XET"] = True
        for name, value in patched.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)
        # Module-level copies of constants.
        for module_name, attr, value in (
            ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", hub_cache),
            ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", assets_cache),
        ):
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                monkeypatch.setattr(module, attr, value)
        if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
            origins = frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)})
            monkeypatch.setattr(_http, "_HUB_ORIGINS", origins)
        # The module-level HfApi behind `huggingface_hub.upload_file` & co. kept the old endpoint.
        monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
        # transformers caches an HfApi (with the import-time endpoint) on first use: reset it.
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
        huggingface_hub.close_session()

        yield hub
    finally:
        hub.stop()
        # Drop pooled keep-alive connections to the stopped server and the HfApi bound to its endpoint (if
        # transformers was imported during the test, monkeypatch has nothing to restore for it).
        with contextlib.suppress(Exception):
            import huggingface_hub

            huggingface_hub.close_session()
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            transformers_hub._hf_api = None


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """A running ``LocalHub`` that huggingface_hub and transformers use for the duration of the test."""
    with use_local_hub(monkeypatch, tmp_path) as hub:
        yield hub


def local_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """Undecorated generator version of the ``local_hub`` fixture, to wrap in your own ``@pytest.fixture``."""
    with use_local_hub(monkeypatch, tmp_path) as hub:
        yield hub
