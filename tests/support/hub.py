"""The Hub fixture: a real HTTP Hub server on localhost (scripts/hub_server.py) and the
unmodified huggingface_hub client pointed at it, with a fresh cache; and the environment of a
child process (a real CLI) that talks to such a server. What the tests push: support/hub_models.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_test_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A server on 127.0.0.1:<free port>; the in-process client pointed at it, with a fresh cache."""
    # Imported when a test asks for the Hub: every test session loads this plugin, and the client
    # reads its HF_* settings at import.
    from huggingface_hub import constants, hf_api

    with HubServer(tokens={TOKEN: "alice", "hf_bob": "bob"}, orgs={"alice": ["ddpm-org"]}) as srv:
        monkeypatch.setattr(constants, "ENDPOINT", srv.endpoint)
        # The module-level client behind huggingface_hub.model_info (what diffusers' pipeline
        # loader calls) took its endpoint at import.
        monkeypatch.setattr(hf_api.api, "endpoint", srv.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            srv.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield srv


def fresh_cache(monkeypatch, tmp_path, name):
    """An empty download cache from now on: the next pull fetches everything again."""
    from huggingface_hub import constants  # as in hub()

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / name))


def hub_env(srv: HubServer, hf_home: Path, token: str | None = TOKEN) -> dict:
    """The environment of a child process that talks to `srv` (the client reads it at import)."""
    env = {**os.environ, "HF_ENDPOINT": srv.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def eval_cli(args, env: dict) -> subprocess.CompletedProcess:
    """`python -m eval ARGS` in a child process, from the project root."""
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
