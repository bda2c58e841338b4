"""Backend selection against this host: read-only detection and persistence in a tmp run dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cni_agent.redirect.backend import (
    LEGACY,
    NFTABLES,
    STATE_FILE,
    BackendError,
    HostDetection,
    detect_host,
    select_backend,
)

pytestmark = pytest.mark.root


def _host_state() -> tuple[str, str, str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except FileNotFoundError:
            return "<absent>"

    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout
    return read("/proc/net/ip_tables_names"), read("/proc/net/ip6_tables_names"), nft, sets


def test_detection_is_read_only_and_ignores_empty_tables() -> None:
    before = _host_state()
    det = detect_host()
    assert _host_state() == before  # no table, chain, rule or set created by probing
    assert det.nft_usable and det.legacy_usable
    # empty legacy tables (this host has an empty ip6 nat table) are not evidence
    assert all(": -A " in r for r in det.legacy_rules)


def test_persist_reuse_override_and_loud_failure(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = select_backend(run_dir, "auto")
    assert first.persisted is False and first.evidence
    state = run_dir / STATE_FILE
    assert state.read_text() == first.name + "\n"
    assert not [p for p in run_dir.iterdir() if p.name != STATE_FILE]  # no temp file left

    again = select_backend(run_dir, "auto")  # restart: reuse, no re-detection decides
    assert (again.name, again.persisted) == (first.name, True)

    other = LEGACY if first.name == NFTABLES else NFTABLES
    override = select_backend(run_dir, other)
    assert (override.name, override.persisted) == (other, False)
    assert state.read_text() == other + "\n"

    # the persisted backend stops working: loud error naming the file, never a silent flip
    broken = HostDetection(legacy_usable=other != LEGACY, nft_usable=other != NFTABLES,
                           legacy_detail="x", nft_detail="gone")
    with pytest.raises(BackendError, match=STATE_FILE):
        select_backend(run_dir, "auto", host_probe=lambda: broken)
    assert state.read_text() == other + "\n"  # untouched


def test_auto_with_legacy_evidence_persists_legacy(tmp_path: Path) -> None:
    det = HostDetection(legacy_rules=("iptables-legacy-save nat: -A POSTROUTING -j X",), legacy_usable=True,
                        nft_usable=True)
    choice = select_backend(tmp_path, "auto", host_probe=lambda: det)
    assert choice.name == LEGACY and "POSTROUTING" in choice.evidence
    assert (tmp_path / STATE_FILE).read_text() == "iptables-legacy\n"
    # detection changes later (e.g. legacy rules gone): persisted choice still wins
    assert select_backend(tmp_path, "auto", host_probe=lambda: HostDetection(
        legacy_usable=True, nft_usable=True)).name == LEGACY
