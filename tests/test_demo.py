"""`localmix demo`, the README's first command, end to end in a fresh home: build, bench, what
the quant costs against F16, one chat turn, the summary; a second run reuses what the first built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCALMIX_HOME": str(home), "COLUMNS": "140"}
    return subprocess.run(
        [sys.executable, "-m", "localmix", "demo", "-t", "1", "--max-tokens", "8"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_offline(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _demo(home)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for stage in ("synth", "convert", "quantize"):
        assert f"✓ {stage}" in first.stderr
    assert "pp256" in out and "tg64" in out  # the bench table
    assert "Q4_K_M against F16: PPL ratio" in out and "same top token" in out
    assert "8 tok" in out and "demo summary" in out and "vs F16" in out
    assert "localmix eval tiny-mistral" in out and "Traceback" not in first.stderr
    quants = sorted(p.name for p in (home / "manifests" / "tiny-mistral").glob("*.json"))
    assert quants == ["F16.json", "Q4_K_M.json"]
    again = _demo(home)
    assert again.returncode == 0, again.stderr
    assert "✓ convert" not in again.stderr  # built once: the second run reuses the store
