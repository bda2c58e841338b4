"""The committed generated protobuf code must match proto/ (drift fails here, not in production)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cni_agent import protogen


def test_committed_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cni_agent.protogen", "--check"],
        cwd=protogen.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--check must be able to fail: point a target at a directory holding stale code."""
    stale = tmp_path / "stale_pb"
    stale.mkdir()
    (stale / "__init__.py").write_text(protogen.INIT_TEXT)
    (stale / "zds_pb2.py").write_text("# stale\n")
    monkeypatch.setattr(protogen, "REPO_ROOT", tmp_path)
    target = protogen.Target("zds.proto", "stale_pb")
    problems = protogen.check([target])
    names = " ".join(problems)
    assert "stale_pb/zds_pb2.py: differs" in names
    assert "stale_pb/zds_pb2.pyi: missing" in names


def test_zds_target_is_in_table() -> None:
    assert protogen.Target("zds.proto", "cni_agent/zds/_pb") in protogen.TARGETS
