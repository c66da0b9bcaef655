"""A local stand-in for the Hugging Face Hub, speaking the HTTP API huggingface_hub uses.

It runs a real HTTP server on 127.0.0.1 (a free port, in a thread) so that huggingface_hub is
exercised end to end, headers and errors included, with ``HF_ENDPOINT`` pointed at it. What it
speaks, as huggingface_hub 2.x uses it:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with ``sha``
  and ``siblings`` (with sizes, blob ids and LFS data when ``?blobs=True``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..``: the file listing, paginated with a
  ``Link: <...>; rel="next"`` header like the real Hub (``page_size`` sets the page length);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (git
  blob id, or sha256 for LFS files, which also get ``X-Linked-Etag``/``X-Linked-Size``),
  ``Content-Length``, and ``Range`` requests answered with 206 and ``Content-Range``;
- ``GET /api/whoami-v2``, and ``GET /api/agent-harnesses`` (a registry huggingface_hub fetches
  at most once a day for its user agent);
- errors as the Hub sends them: ``X-Error-Code: RepoNotFound`` (401 without a token, 404 with
  one; a private repository looks missing to whoever cannot read it), ``RevisionNotFound`` and
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with one not on the list), and
  401 ``Invalid credentials in Authorization header`` for an unknown token.

Repositories are folders built by tests: ``root/{org}/{name}/{commit}/...`` holds each commit's
files; branches and tags map names to commits. Every request is recorded (method, path, query,
headers, status) so tests can check which files were fetched and that a cached run sends none.
Faults can be injected: an HTTP error status for any path, or, for a file download, a
connection cut after some bytes; and what a hostile or broken endpoint does: an answer that never
comes (:meth:`FakeHub.stall_next_request`), a body that never ends
(:meth:`FakeHub.endless_next_request`), a file whose bytes differ from what the listing says
(:meth:`FakeHub.tamper`). File names are repository paths as given, ``../x`` included (git
forbids them; a mirror need not), and are stored on disk under quoted names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

# Extensions the Hub's default .gitattributes stores with Git LFS; bigger files always are.
LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                  ".model", ".tiktoken", ".zip", ".tar", ".npy", ".pkl")
LFS_THRESHOLD = 10 * 1024 * 1024


@dataclass
class RecordedRequest:
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    status: int | None = None

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} -> {self.status}>"


@dataclass
class _File:
    disk: Path
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid


@dataclass
class _Commit:
    sha: str
    files: dict[str, _File]


@dataclass
class _Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)  # users who may read a private/gated repo
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


@dataclass
class _Fault:
    status: int | None = None
    cut_after: int | None = None


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class FakeHub:
    """The server and the repositories it serves. Use ``start()``/``stop()`` or ``with``."""

    def __init__(self, root: Path, *, page_size: int = 1000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.page_size = page_size
        self.repos: dict[str, _Repo] = {}
        self.tokens: dict[str, str] = {}  # token -> user name
        self._requests: list[RecordedRequest] = []
        self._faults: dict[tuple[str, str], list[_Fault]] = {}
        self._path_faults: dict[str, list[int | str]] = {}
        self._released = threading.Event()  # set by stop(): stalled handlers give up
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set = set()  # open client sockets, closed by stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection, as a vanished server would."""
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for sock in connections:
            # Keep-alive handler threads outlive shutdown(); without this, a client's pooled
            # connection would still be answered after the server "stopped".
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- building repositories ---------------------------------------------------------------

    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False,
                    readers: tuple[str, ...] = ()) -> None:
        assert repo_id.count("/") == 1, repo_id
        self.repos[repo_id] = _Repo(repo_id, private=private, gated=gated, readers=set(readers))

    def commit(self, repo_id: str, files: Mapping[str, bytes | str | Path] | Path, *,
               branch: str | None = "main", parent: str | None = None) -> str:
        """Add a commit whose tree is exactly ``files`` (name -> content or file, or a folder).

        It goes on top of ``branch`` (created if needed; ``None`` leaves every branch alone, for
        a commit reachable only by hash or tag). Returns the commit hash.
        """
        if repo_id not in self.repos:
            self.create_repo(repo_id)
        repo = self.repos[repo_id]
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p for p in sorted(files.rglob("*")) if p.is_file()}
        contents: dict[str, bytes] = {}
        for name, value in files.items():
            if isinstance(value, Path):
                contents[name] = value.read_bytes()
            elif isinstance(value, str):
                contents[name] = value.encode()
            else:
                contents[name] = bytes(value)
        parent = parent or (repo.branches.get(branch) if branch else None)
        digest = hashlib.sha1()
        digest.update(f"{repo_id}\n{parent}\n{next(self._counter)}\n".encode())
        for name in sorted(contents):
            digest.update(f"{name}\0{_git_blob_oid(contents[name])}\n".encode())
        sha = digest.hexdigest()
        folder = self.root / repo_id / sha
        folder.mkdir(parents=True, exist_ok=True)
        entries: dict[str, _File] = {}
        for name, data in contents.items():
            disk = folder / quote(name, safe="")
            disk.write_bytes(data)
            if name.endswith(LFS_EXTENSIONS) or len(data) > LFS_THRESHOLD:
                sha256 = hashlib.sha256(data).hexdigest()
                oid = _git_blob_oid(_lfs_pointer(sha256, len(data)))
            else:
                sha256, oid = None, _git_blob_oid(data)
            entries[name] = _File(disk, len(data), oid, sha256)
        repo.commits[sha] = _Commit(sha, entries)
        if branch:
            repo.branches[branch] = sha
        return sha

    def set_branch(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].branches[name] = sha

    def set_tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].tags[name] = sha

    def delete_repo(self, repo_id: str) -> None:
        self.repos.pop(repo_id)
        shutil.rmtree(self.root / repo_id, ignore_errors=True)

    # -- faults ------------------------------------------------------------------------------

    def fail_next_get(self, repo_id: str, path: str, *, status: int | None = None,
                      cut_after: int | None = None) -> None:
        """Make the next GET of this file fail: answer ``status``, or send ``cut_after`` bytes
        of a 200 response that announced the whole file and close the connection."""
        assert (status is None) != (cut_after is None)
        with self._lock:
            self._faults.setdefault((repo_id, path), []).append(_Fault(status, cut_after))

    def fail_next_request(self, path: str, status: int) -> None:
        """Answer the next request for this (percent-decoded) URL path with ``status``."""
        with self._lock:
            self._path_faults.setdefault(path, []).append(status)

    def stall_next_request(self, path: str, times: int = 1) -> None:
        """Accept the next ``times`` requests for this URL path and never answer them (until
        ``stop()``)."""
        with self._lock:
            self._path_faults.setdefault(path, []).extend(["stall"] * times)

    def endless_next_request(self, path: str) -> None:
        """Answer the next request for this URL path with a 200 whose chunked JSON body never
        ends (until the client hangs up or ``stop()``)."""
        with self._lock:
            self._path_faults.setdefault(path, []).append("endless")

    def tamper(self, repo_id: str, commit: str, path: str, data: bytes) -> None:
        """Serve ``data`` for the file from now on, while the listing, ETag and size headers keep
        describing the committed file: what a corrupting proxy or mirror does."""
        self.repos[repo_id].commits[commit].files[path].disk.write_bytes(data)

    def _take_path_fault(self, path: str) -> int | str | None:
        with self._lock:
            queue = self._path_faults.get(path)
            return queue.pop(0) if queue else None

    def _take_fault(self, repo_id: str, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get((repo_id, path))
            return queue.pop(0) if queue else None

    # -- recorded requests -------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def file_requests(self, method: str | None = None) -> list[str]:
        """``{rev}/{path}`` of every ``/resolve/`` request (optionally of one method), in order."""
        out = []
        for r in self.requests:
            parts = r.path.split("/")
            if len(parts) > 5 and parts[3] == "resolve" and (method is None or r.method == method):
                out.append("/".join(parts[4:]))
        return out

    def fetched_paths(self, method: str | None = None) -> set[str]:
        """Repository paths requested through ``/resolve/``, whatever the revision."""
        return {p.split("/", 1)[1] for p in self.file_requests(method)}

    # -- lookups used by the handler ---------------------------------------------------------

    def resolve_revision(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        if len(revision) >= 7:
            hits = [sha for sha in repo.commits if sha.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        return None


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read hub.requests instead

    def send_response(self, code: int, message: str | None = None) -> None:
        record = getattr(self, "_record", None)
        if record is not None:
            record.status = code
        super().send_response(code, message)

    # -- dispatch ----------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        split = urlsplit(self.path)
        raw_segments = split.path.split("/")[1:]
        # Split before decoding: a revision such as "feature/x" arrives as one %2F-quoted segment.
        segs = [unquote(s) for s in raw_segments]
        self._record = RecordedRequest(
            method=self.command, path=unquote(split.path), query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self.hub._record(self._record)
        try:
            injected = self.hub._take_path_fault(self._record.path)
            if injected == "stall":
                self.hub._released.wait()
                self.close_connection = True
                return
            if injected == "endless":
                self._endless()
                return
            if injected is not None:
                raise _HubError(injected, None, "Injected failure")
            user = self._user()
            if segs[:2] == ["api", "agent-harnesses"]:
                # huggingface_hub fetches this registry once a day for its user agent.
                self._json({"standardEnvVars": [], "harnesses": {}}, head)
            elif segs[:2] == ["api", "whoami-v2"]:
                if user is None:
                    raise _HubError(401, None, "Invalid username or password.")
                self._json({"type": "user", "name": user, "auth": {"type": "access_token"}}, head)
            elif segs[:2] == ["api", "models"] and len(segs) >= 4:
                repo_id = f"{segs[2]}/{segs[3]}"
                rest = segs[4:]
                if not rest:
                    self._model_info(repo_id, "main", user, head)
                elif rest[0] == "revision" and len(rest) == 2:
                    self._model_info(repo_id, rest[1], user, head)
                elif rest[0] == "tree" and len(rest) >= 2:
                    self._tree(repo_id, rest[1], "/".join(rest[2:]), user, head)
                else:
                    raise _HubError(404, None, "Not Found")
            elif len(segs) >= 5 and segs[2] == "resolve":
                self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), user, head)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as err:
            self._error(err, head)

    # -- auth --------------------------------------------------------------------------------

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, user: str | None, *, files: bool) -> _Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user not in repo.readers):
            # The Hub does not tell a private repository from a missing one, and answers 401 to
            # anonymous requests (which could become a 200 with credentials).
            raise _HubError(401 if user is None else 404, "RepoNotFound", "Repository not found")
        if files and repo.gated and user not in repo.readers:
            if user is None:
                raise _HubError(401, "GatedRepo",
                                f"Access to model {repo_id} is restricted. You must have access to it "
                                f"and be authenticated to access it. Please log in.")
            raise _HubError(403, "GatedRepo",
                            f"Access to model {repo_id} is restricted and you are not in the authorized "
                            f"list. Visit {self._base()}/{repo_id} to ask for access.")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        sha = self.hub.resolve_revision(repo, revision)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]

    def _base(self) -> str:
        return self.hub.url

    # -- endpoints ---------------------------------------------------------------------------

    def _model_info(self, repo_id: str, revision: str, user: str | None, head: bool) -> None:
        repo = self._repo(repo_id, user, files=False)
        commit = self._commit(repo, revision)
        blobs = self._record.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name in sorted(commit.files):
            entry: dict = {"rfilename": name}
            if blobs:
                f = commit.files[name]
                entry.update(size=f.size, blobId=f.git_oid)
                if f.sha256:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["transformers", "safetensors"],
            "library_name": "transformers",
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }, head)

    def _tree(self, repo_id: str, revision: str, path: str, user: str | None, head: bool) -> None:
        repo = self._repo(repo_id, user, files=False)
        commit = self._commit(repo, revision)
        recursive = self._record.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(n.startswith(prefix) for n in commit.files):
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                            {"X-Repo-Commit": commit.sha})
        entries: list[dict] = []
        folders: set[str] = set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folders.add(prefix + "/".join(parts[:depth]))
            if not recursive and len(parts) > 1:
                continue
            f = commit.files[name]
            entry: dict = {"type": "file", "oid": f.git_oid, "size": f.size, "path": name}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        listing = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(folders)] + entries
        start = int(self._record.query.get("cursor", ["0"])[0])
        page = listing[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            query = {k: v[0] for k, v in self._record.query.items()}
            query["cursor"] = str(start + self.hub.page_size)
            raw_path = urlsplit(self.path).path
            headers["Link"] = f'<{self._base()}{raw_path}?{urlencode(query)}>; rel="next"'
        self._json(page, head, headers)

    def _resolve(self, repo_id: str, revision: str, path: str, user: str | None, head: bool) -> None:
        repo = self._repo(repo_id, user, files=True)
        commit = self._commit(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        if f.sha256:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if head:
            self._send(200, headers, b"", head=True, length=f.size)
            return
        fault = self.hub._take_fault(repo_id, path)
        if fault is not None and fault.status is not None:
            raise _HubError(fault.status, None, "Injected failure")
        data = f.disk.read_bytes()
        status, body = 200, data
        range_header = self.headers.get("Range")
        if range_header:
            span = _parse_range(range_header, len(data))
            if span is None:
                self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", head=False)
                return
            first, last = span
            status, body = 206, data[first:last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        if fault is not None and fault.cut_after is not None:
            # Announce the whole body, send part of it, then drop the connection: what a
            # network failure mid-download looks like to the client.
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:fault.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, headers, body, head=False)

    # -- responses ---------------------------------------------------------------------------

    def _endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b'{"rfilename": "padding.txt"},' * 2000
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        self.close_connection = True
        try:
            self.wfile.write(b'5\r\n{"id"\r\n')
            while not self.hub._released.is_set():
                self.wfile.write(frame)
        except OSError:  # the client hung up: what it should do
            pass

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, head: bool,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, payload: object, head: bool, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                   body, head=head)

    def _error(self, err: _HubError, head: bool) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": err.message,
                   **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, headers, json.dumps({"error": err.message}).encode(), head=head)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` (one range) -> inclusive (first, last)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first_s, _, last_s = spec.strip().partition("-")
    try:
        if first_s == "":
            n = int(last_s)
            first, last = max(size - n, 0), size - 1
        else:
            first = int(first_s)
            last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    last = min(last, size - 1)
    if first > last or first >= size:
        return None
    return first, last
