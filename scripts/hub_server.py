"""A small Hugging Face Hub-compatible HTTP server for the tests (standard library only).

The real Hub cannot be reached from CI, and no Hub server on PyPI implements the write path, so
this one implements the routes the unmodified `huggingface_hub` client (2.x, httpx) calls, with
the headers it reads:

  GET  /api/whoami-v2                                  token -> user (401 when missing/invalid)
  POST /api/repos/create                               409 when the repo exists
  GET  /api/{type}s/{repo}[/revision/{rev}]            repo info: sha, private, siblings
  POST /api/{type}s/{repo}/branch/{branch}             {startingPoint}; 409 when it exists
  GET  /api/{type}s/{repo}/refs | commits/{rev} | tree/{rev}[/{path}]
  POST /api/{type}s/{repo}/preupload/{rev}             uploadMode lfs|regular, remote oid
  POST /api/{type}s/{repo}/commit/{rev}                ndjson: header, file, lfsFile, deleted*
  POST /{repo}.git/info/lfs/objects/batch              LFS batch (basic transfer) + verify
  PUT  /lfs-upload/{oid}                               the "storage" upload (sha256 checked)
  POST /api/validate-yaml                              model card metadata
  HEAD|GET /{repo}/resolve/{rev}/{path}                ETag, X-Repo-Commit, Content-Length;
                                                       LFS: 302 to a CDN host + X-Linked-Etag/-Size
  GET  /cdn/{oid}                                      the CDN (no auth, like a signed URL)

Every create_commit is one commit id; a commit is applied under a lock, all or nothing, and LFS
blobs uploaded but never committed stay invisible. `HubServer.inject(...)` adds faults (an HTTP
status or a connection reset, before or after the handler ran) for retry tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".png", ".jpg", ".tar", ".zip")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{e} filter=lfs diff=lfs merge=lfs -text\n" for e in LFS_EXTENSIONS).encode()
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # in git / LFS URLs


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` / ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """A file in a commit: inline content, or an LFS object (sha256 `lfs_oid`)."""

    size: int
    content: bytes | None = None
    lfs_oid: str | None = None

    @property
    def git_oid(self) -> str:
        return git_blob_oid(self.content if self.lfs_oid is None else lfs_pointer(self.lfs_oid, self.size))


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        return self.commits.get(rev)

    def history(self, head: str) -> list[Commit]:
        out, cid = [], head
        while cid is not None:
            out.append(self.commits[cid])
            cid = self.commits[cid].parent
        return out


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | None  # None = reset the connection
    times: int  # how many matching requests it hits; -1 = forever
    after: bool  # run the handler first (the change is applied), then lose the response


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubState:
    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens)  # token -> user name
        self.orgs = dict(orgs or {})  # user -> organisations they can write to
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded objects (sha256 -> bytes); visible only once committed
        self.lock = threading.RLock()

    def user(self, token: str | None) -> str | None:
        return self.tokens.get(token) if token else None

    def can_write(self, user: str | None, repo_id: str) -> bool:
        ns = repo_id.split("/")[0]
        return user is not None and (ns == user or ns in self.orgs.get(user, []))

    def repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        r = self.repos.get((repo_type, repo_id))
        if r is None or (r.private and not self.can_write(user, repo_id)):
            # The Hub answers 401 + RepoNotFound for missing and for private repos alike.
            raise HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        if write and not self.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return r

    def commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str, message: str,
               author: str) -> Commit:
        """A new commit on top of `branch`'s head. A client's parentCommit is checked by the commit
        route (412 when it is not the head), holding this lock until the commit is made."""
        with self.lock:
            head = repo.branches.get(branch)
            digest = hashlib.sha1(f"{head}|{title}|{uuid.uuid4()}".encode()).hexdigest()
            c = Commit(digest, head, files, title, message, author,
                       time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
            repo.commits[c.id] = c
            repo.branches[branch] = c.id
            return c


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    server: "_Server"

    def log_message(self, *args):  # quiet; requests are recorded in HubServer.requests
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, the client sees a reset, not a clean EOF.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _handle(self) -> None:
        hub: HubServer = self.server.hub
        url = urlsplit(self.path)
        body = self._body() if self.command in ("POST", "PUT") else b""
        fault = hub._take_fault(self.command, url.path)
        if fault is not None and not fault.after:
            hub._record(self.command, url.path, fault.status or 0)
            if fault.status is None:
                return self._reset()
            return self._json({"error": f"injected {fault.status}"}, fault.status)
        if fault is not None:  # run the handler, then lose the response
            self.wfile = _Discard()
        status = 500
        try:
            status = self._route(url.path, parse_qs(url.query), body)
        except HubError as e:
            status = e.status
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message}, e.status, headers)
        hub._record(self.command, url.path, status)
        if fault is not None:
            self._reset()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    # ------------------------------------------------------------------ routes
    def _route(self, path: str, query: dict, body: bytes) -> int:
        hub: HubServer = self.server.hub
        st = hub.state
        auth = self.headers.get("Authorization", "")
        user = st.user(auth[7:] if auth.startswith("Bearer ") else None)
        m, meth = None, self.command

        def match(pattern: str) -> bool:
            nonlocal m
            m = re.fullmatch(pattern, path)
            return m is not None

        if meth == "GET" and match(r"/api/whoami-v2"):
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            orgs = [{"name": o} for o in st.orgs.get(user, [])]
            self._json({"type": "user", "name": user, "orgs": orgs,
                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            return 200
        if meth == "POST" and match(r"/api/validate-yaml"):
            return self._validate_yaml(json.loads(body or b"{}"))
        if meth == "POST" and match(r"/api/repos/create"):
            return self._create_repo(json.loads(body), user)
        if match(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(/.*)?"):
            rtype, repo_id, rest = _TYPES[m.group(1)], m.group(2), m.group(3) or ""
            return self._api(meth, rtype, repo_id, rest, query, body, user)
        if meth == "POST" and match(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)"):
            rtype = _TYPES.get(m.group(1) or "models")
            repo = st.repo(rtype, m.group(2), user, write=True)
            return self._lfs(m.group(3), repo, json.loads(body))
        if meth == "PUT" and match(r"/lfs-upload/([0-9a-f]{64})"):
            oid = m.group(1)
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "uploaded content does not match its sha256")
            with st.lock:
                st.lfs[oid] = body
            self._send(200, b"")
            return 200
        if meth in ("GET", "HEAD") and match(r"/cdn/([0-9a-f]{64})"):
            data = st.lfs.get(m.group(1))
            if data is None:
                raise HubError(404, "no such object")
            return self._serve(data, {"ETag": f'"{m.group(1)}"'})
        if meth in ("GET", "HEAD") and match(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)"):
            rtype = _TYPES.get(m.group(1) or "models")
            return self._resolve(rtype, m.group(2), unquote(m.group(3)), unquote(m.group(4)), user)
        raise HubError(404, f"no route for {meth} {path}")

    def _serve(self, data: bytes, headers: dict) -> int:
        rng = self.headers.get("Range")
        if rng and (r := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = int(r.group(1))
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            self._send(206, data[start:], headers, "application/octet-stream")
            return 206
        self._send(200, data, headers, "application/octet-stream")
        return 200

    def _create_repo(self, p: dict, user: str | None) -> int:
        st, hub = self.server.hub.state, self.server.hub
        repo_id = f"{p.get('organization') or user}/{p['name']}"
        rtype = p.get("type") or "model"
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if not st.can_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to create a repo under '{repo_id.split('/')[0]}'")
        private = p.get("visibility", "public") == "private" or bool(p.get("private"))
        with st.lock:
            if (rtype, repo_id) in st.repos:  # the Hub's 409 still carries the url (exist_ok reads it)
                self._json({"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}, 409,
                           {"X-Error-Message": "You already created this model repo"})
                return 409
            repo = Repo(repo_id, rtype, user, private)
            st.repos[(rtype, repo_id)] = repo
            # Like the Hub, a new repo starts with one commit holding .gitattributes.
            st.commit(repo, "main", {".gitattributes": Entry(len(GITATTRIBUTES), GITATTRIBUTES)},
                      "initial commit", "", user)
        self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        return 200

    def _api(self, meth, rtype, repo_id, rest, query, body, user) -> int:
        st = self.server.hub.state
        write = meth == "POST"
        repo = st.repo(rtype, repo_id, user, write=write)
        m = re.fullmatch(r"(?:/revision/([^/]+))?/?", rest)
        if meth == "GET" and m:
            c = self._commit_or_404(repo, unquote(m.group(1) or "main"))
            siblings = [{"rfilename": p, "size": e.size, "blobId": e.git_oid,
                         **({"lfs": {"sha256": e.lfs_oid, "size": e.size, "pointerSize": 134}} if e.lfs_oid else {})}
                        for p, e in sorted(c.files.items())]
            self._json({"id": repo_id, "modelId": repo_id, "sha": c.id, "private": repo.private,
                        "author": repo_id.split("/")[0], "lastModified": c.date, "siblings": siblings,
                        "tags": [], "disabled": False, "gated": False})
            return 200
        if meth == "GET" and rest == "/refs":
            self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": cid}
                                     for b, cid in repo.branches.items()],
                        "converts": [], "tags": [], "pullRequests": []})
            return 200
        if meth == "GET" and (m := re.fullmatch(r"/commits/([^/]+)", rest)):
            c = self._commit_or_404(repo, unquote(m.group(1)))
            self._json([{"id": h.id, "title": h.title, "message": h.message, "date": h.date,
                         "authors": [{"user": h.author}]} for h in repo.history(c.id)])
            return 200
        if meth == "GET" and (m := re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)):
            return self._tree(repo, unquote(m.group(1)), unquote(m.group(2) or ""), query)
        if meth == "POST" and (m := re.fullmatch(r"/branch/([^/]+)", rest)):
            branch = unquote(m.group(1))
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            with st.lock:
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                repo.branches[branch] = self._commit_or_404(repo, start).id
            self._json({})
            return 200
        if meth == "POST" and (m := re.fullmatch(r"/preupload/([^/]+)", rest)):
            c = self._commit_or_404(repo, unquote(m.group(1)))
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = (f["path"].endswith(LFS_EXTENSIONS) or b"\0" in sample or f["size"] >= LFS_SIZE_THRESHOLD)
                old = c.files.get(f["path"])
                oid = None if old is None else (old.lfs_oid or old.git_oid)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})
            self._json({"files": files, "commitOid": c.id})
            return 200
        if meth == "POST" and (m := re.fullmatch(r"/commit/([^/]+)", rest)):
            return self._commit(repo, unquote(m.group(1)), body, query, user)
        raise HubError(404, f"no route for {meth} /api/{rtype}s/{repo_id}{rest}")

    def _commit_or_404(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def _tree(self, repo: Repo, rev: str, prefix: str, query: dict) -> int:
        c = self._commit_or_404(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        base = prefix.rstrip("/") + "/" if prefix else ""
        out, folders = [], set()
        for p, e in sorted(c.files.items()):
            if not p.startswith(base):
                continue
            rel = p[len(base):]
            parts = rel.split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "path": p, "size": e.size, "oid": e.git_oid}
                if e.lfs_oid:
                    item["lfs"] = {"oid": e.lfs_oid, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs_oid, e.size))}
                out.append(item)
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)]
        if prefix and not out:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound")
        self._json(out)
        return 200

    def _lfs(self, action: str, repo: Repo, p: dict) -> int:
        hub = self.server.hub
        if action == "verify":
            if p["oid"] not in hub.state.lfs or len(hub.state.lfs[p["oid"]]) != p["size"]:
                raise HubError(422, "object not uploaded")
            self._json({})
            return 200
        objects = []
        for o in p["objects"]:
            if o["oid"] in hub.state.lfs:
                objects.append({"oid": o["oid"], "size": o["size"]})  # already there: no actions
            else:
                objects.append({"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}"},
                    "verify": {"href": f"{hub.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"
                                       ".git/info/lfs/objects/verify"}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   ctype="application/vnd.git-lfs+json")
        return 200

    def _commit(self, repo: Repo, branch: str, body: bytes, query: dict, user: str) -> int:
        st, hub = self.server.hub.state, self.server.hub
        if "create_pr" in query:
            raise HubError(400, "pull requests are not supported by the test server")
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with st.lock:  # all or nothing: validate every operation, then apply
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if header.get("parentCommit") and header["parentCommit"] != head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op in lines[1:]:
                v = op["value"]
                if op["key"] == "file":
                    content = base64.b64decode(v["content"])
                    files[v["path"]] = Entry(len(content), content)
                elif op["key"] == "lfsFile":
                    data = st.lfs.get(v["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    files[v["path"]] = Entry(len(data), None, v["oid"])
                elif op["key"] == "deletedFile":
                    if files.pop(v["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                elif op["key"] == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown commit operation {op['key']!r}")
            message = header.get("summary", "")
            desc = header.get("description") or ""
            c = st.commit(repo, branch, files, message, f"{message}\n\n{desc}".strip(), user)
        self._json({"success": True, "commitOid": c.id, "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{c.id}",
                    "pullRequestUrl": None})
        return 200

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str, user: str | None) -> int:
        st, hub = self.server.hub.state, self.server.hub
        repo = st.repo(rtype, repo_id, user)
        c = self._commit_or_404(repo, rev)
        e = c.files.get(path)
        if e is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": c.id})
        headers = {"X-Repo-Commit": c.id, "ETag": f'"{e.git_oid}"', "Accept-Ranges": "bytes"}
        if e.lfs_oid is None:
            return self._serve(e.content, headers)
        # LFS: a redirect to another host (the CDN), the metadata carried by the redirect itself.
        headers.update({"X-Linked-Etag": f'"{e.lfs_oid}"', "X-Linked-Size": str(e.size),
                        "Location": f"{hub.cdn_endpoint}/cdn/{e.lfs_oid}"})
        self._send(302, b"", headers)
        return 302

    def _validate_yaml(self, p: dict) -> int:
        content = p.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if not m:
            self._json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
            return 200
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return self._yaml_errors([f"Invalid YAML: {str(e).splitlines()[0]}"])
        errors = []
        if not isinstance(meta, dict):
            return self._yaml_errors(["metadata must be a mapping"])
        for key in ("tags", "datasets"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                errors.append(f'"{key}" must be an array of strings')
        for key in ("library_name", "license", "pipeline_tag"):
            if key in meta and not isinstance(meta[key], str):
                errors.append(f'"{key}" must be a string')
        for i, model in enumerate(meta.get("model-index") or []):
            for j, res in enumerate(model.get("results") or [] if isinstance(model, dict) else [None]):
                where = f'"model-index[{i}].results[{j}]'
                if not isinstance(res, dict) or not isinstance(res.get("task"), dict) or "type" not in res["task"]:
                    errors.append(f'{where}.task.type" is required')
                    continue
                ds = res.get("dataset")
                if not isinstance(ds, dict) or not {"type", "name"} <= set(ds):
                    errors.append(f'{where}.dataset" must have "type" and "name"')
                for k, metric in enumerate(res.get("metrics") or []):
                    if not isinstance(metric, dict) or "type" not in metric or "value" not in metric:
                        errors.append(f'{where}.metrics[{k}]" must have "type" and "value"')
        if errors:
            return self._yaml_errors(errors)
        self._json({})
        return 200

    def _yaml_errors(self, errors: list[str]) -> int:
        self._json({"errors": [{"message": e} for e in errors]}, 400)
        return 400


class _Discard:
    closed = False

    def close(self):
        pass

    def write(self, data):
        return len(data)

    def flush(self):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"

    def __init__(self, *args):
        super().__init__(*args)
        self.live: set[socket.socket] = set()  # keep-alive connections, closed by stop()
        self.live_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)


class HubServer:
    """A running server on 127.0.0.1 with a free port; use as a context manager or start()/stop()."""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 cdn_host: str = "localhost"):
        self.state = HubState(tokens if tokens is not None else {"hf_test_token": "alice"}, orgs)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # LFS downloads redirect to another origin (as the Hub does to its CDN): the client must
        # take the metadata from the redirect and drop its token for the download.
        self.cdn_endpoint = f"http://{cdn_host}:{self.port}"
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def inject(self, method: str, path_regex: str, status: int | None = 503, times: int = 1,
               after: bool = False) -> None:
        """Fail the next `times` requests matching (method, path regex) with `status`, or with a
        connection reset when status is None; `after=True` applies the request, then loses the reply."""
        with self._lock:
            self._faults.append(Fault(method.upper(), re.compile(path_regex), status, times, after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.method == method and f.pattern.search(path) and f.times != 0:
                    f.times -= 1 if f.times > 0 else 0
                    return f
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def commits(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[Commit]:
        repo = self.state.repos[(repo_type, repo_id)]
        return repo.history(repo.branches[branch])

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: the Hub is unreachable afterwards."""
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._httpd.live_lock:
            live = list(self._httpd.live)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
