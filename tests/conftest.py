"""Shared fixtures: an isolated LOCALMIX_HOME for every test, and tiny models built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def localmix_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LOCALMIX_HOME; nothing touches the user's real store or cache."""
    home = tmp_path / "localmix-home"
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("LOCALMIX_DEBUG", raising=False)
    return home
