"""The test Hub server itself, driven by the unmodified huggingface_hub client and by raw HTTP:
the promises the push tests rely on (atomic commits, headers, redirects, auth, faults)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx2
import pytest

from scripts.hub_server import git_blob_oid
from support.hub import TOKEN, fresh_cache

AUTH = {"authorization": f"Bearer {TOKEN}"}


def _commit(srv, repo, lines, branch="main"):
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return httpx2.post(f"{srv.endpoint}/api/models/{repo}/commit/{branch}", content=body,
                       headers={**AUTH, "content-type": "application/x-ndjson"})


def test_roundtrip_headers_and_cdn_redirect(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    api = HfApi()
    api.create_repo("alice/files")
    weights = bytes(range(256)) * 4096  # binary -> LFS
    api.upload_file(repo_id="alice/files", path_in_repo="w.bin", path_or_fileobj=weights)
    api.upload_file(repo_id="alice/files", path_in_repo="sub/notes.txt", path_or_fileobj=b"hello")
    sha = api.model_info("alice/files").sha

    meta = get_hf_file_metadata(hf_hub_url("alice/files", "sub/notes.txt"))
    assert meta.commit_hash == sha and meta.etag == git_blob_oid(b"hello") and meta.size == 5
    head = httpx2.head(hf_hub_url("alice/files", "w.bin"), headers=AUTH)
    assert head.status_code == 302 and head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["Location"].startswith(hub.cdn_endpoint) and hub.cdn_endpoint != hub.endpoint
    meta = get_hf_file_metadata(hf_hub_url("alice/files", "w.bin"))
    assert meta.size == len(weights) and meta.commit_hash == sha and len(meta.etag) == 64

    fresh_cache(monkeypatch, tmp_path, "c2")
    assert Path(hf_hub_download("alice/files", "w.bin")).read_bytes() == weights
    assert Path(hf_hub_download("alice/files", "sub/notes.txt")).read_bytes() == b"hello"
    assert {f.path for f in api.list_repo_tree("alice/files", recursive=True)} == {
        ".gitattributes", "w.bin", "sub", "sub/notes.txt"}
    # The same content again is a no-op: no empty commit.
    api.upload_file(repo_id="alice/files", path_in_repo="w.bin", path_or_fileobj=weights)
    assert api.model_info("alice/files").sha == sha


def test_commit_is_all_or_nothing_and_checks_its_parent(hub):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("alice/atomic")
    head = api.model_info("alice/atomic").sha
    header = {"key": "header", "value": {"summary": "two files", "description": ""}}
    ok_file = {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode(),
                                        "encoding": "base64"}}
    missing_lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    r = _commit(hub, "alice/atomic", [header, ok_file, missing_lfs])
    assert r.status_code == 422 and "never uploaded" in r.json()["error"]
    assert api.model_info("alice/atomic").sha == head and "a.txt" not in api.list_repo_files("alice/atomic")

    stale = {"key": "header", "value": {"summary": "x", "parentCommit": "f" * 40}}
    assert _commit(hub, "alice/atomic", [stale, ok_file]).status_code == 412
    good = {"key": "header", "value": {"summary": "x", "parentCommit": head}}
    r = _commit(hub, "alice/atomic", [good, ok_file])
    assert r.status_code == 200 and api.model_info("alice/atomic").sha == r.json()["commitOid"] != head


def test_auth_private_repos_branches(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    alice, bob = HfApi(token=TOKEN), HfApi(token="hf_bob")
    alice.create_repo("alice/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info("alice/secret")
    assert httpx2.get(f"{hub.endpoint}/api/models/alice/secret").status_code == 401
    with pytest.raises(RepositoryNotFoundError):  # a private repo is invisible, also to writes
        bob.upload_file(repo_id="alice/secret", path_in_repo="x", path_or_fileobj=b"x")
    alice.create_repo("alice/public")
    with pytest.raises(Exception, match="403 Forbidden"):
        bob.upload_file(repo_id="alice/public", path_in_repo="x", path_or_fileobj=b"x")
    alice.create_branch("alice/secret", branch="dev")
    alice.create_branch("alice/secret", branch="dev", exist_ok=True)
    with pytest.raises(Exception, match="409"):
        alice.create_branch("alice/secret", branch="dev")
    alice.upload_file(repo_id="alice/secret", path_in_repo="x.txt", path_or_fileobj=b"x", revision="dev")
    assert "x.txt" in alice.list_repo_files("alice/secret", revision="dev")
    assert "x.txt" not in alice.list_repo_files("alice/secret")
    with pytest.raises(RevisionNotFoundError):
        alice.model_info("alice/secret", revision="nope")
    assert {b.name for b in alice.list_repo_refs("alice/secret").branches} == {"main", "dev"}


def test_model_card_metadata_validation(hub):
    from huggingface_hub import ModelCard

    good = ModelCard("---\nlibrary_name: x\ntags: [a]\nmodel-index:\n- name: m\n  results:\n  - task: {type: t}\n"
                     "    dataset: {type: d, name: D}\n    metrics: [{type: fid, value: 1.0}]\n---\n# hi\n")
    good.validate()
    with pytest.raises(ValueError, match=r'library_name.{0,3} must be a string'):
        ModelCard("---\nlibrary_name: [1, 2]\n---\n").validate()
    bad = ("---\nmodel-index:\n- name: m\n  results:\n  - task: {type: t}\n    dataset: {name: D}\n"
           "    metrics: [{value: 1.0}]\n---\n")
    r = httpx2.post(f"{hub.endpoint}/api/validate-yaml", json={"content": bad, "repoType": "model"}, headers=AUTH)
    assert r.status_code == 400 and [e["message"] for e in r.json()["errors"]] == [
        '"model-index[0].results[0].dataset" must have "type" and "name"',
        '"model-index[0].results[0].metrics[0]" must have "type" and "value"']
    r = httpx2.post(f"{hub.endpoint}/api/validate-yaml", json={"content": "# no metadata\n"}, headers=AUTH)
    assert r.status_code == 200 and "missing yaml metadata" in r.json()["warnings"][0]["message"]


def test_fault_injection_reset_and_status(hub):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("alice/faults")
    # preupload goes through the client's own backoff: one reset, then it succeeds
    hub.inject("POST", r"/preupload/", status=None)
    api.upload_file(repo_id="alice/faults", path_in_repo="a.txt", path_or_fileobj=b"a")
    assert [s for _, p, s in hub.requests if "/preupload/" in p] == [0, 200]
    hub.inject("GET", r"/api/whoami-v2", status=502, times=-1)
    for _ in range(2):
        assert httpx2.get(f"{hub.endpoint}/api/whoami-v2", headers=AUTH).status_code == 502
    hub.clear_faults()
    assert httpx2.get(f"{hub.endpoint}/api/whoami-v2", headers=AUTH).json()["name"] == "alice"
