"""The Hub fixture: a real HTTP Hub server on localhost (scripts/hub_server.py) and the
unmodified huggingface_hub client pointed at it, with a fresh cache."""

from __future__ import annotations

import pytest

from scripts.hub_server import HubServer

TOKEN = "hf_test_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A server on 127.0.0.1:<free port>; the in-process client pointed at it, with a fresh cache."""
    from huggingface_hub import constants

    with HubServer(tokens={TOKEN: "alice", "hf_bob": "bob"}, orgs={"alice": ["ddpm-org"]}) as srv:
        monkeypatch.setattr(constants, "ENDPOINT", srv.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            srv.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield srv


def fresh_cache(monkeypatch, tmp_path, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / name))
