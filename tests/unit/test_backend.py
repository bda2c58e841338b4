"""The backend-selection policy (redirect-rules.md §10), fed fake detections; no I/O."""

from __future__ import annotations

import pytest

from cni_agent.redirect.backend import (
    LEGACY,
    NFTABLES,
    BackendError,
    HostDetection,
    decide,
    legacy_rules_from_save,
    nft_rules_from_listing,
)

STATE = "/run/x/rules-backend"
BOTH = HostDetection(legacy_usable=True, legacy_detail="legacy ok", nft_usable=True, nft_detail="nft ok")
LEGACY_IN_USE = HostDetection(legacy_rules=("iptables-legacy-save nat: -A POSTROUTING -j KUBE-POSTROUTING",),
                              legacy_usable=True, nft_usable=True, nft_detail="nft ok")


def test_auto_without_evidence_prefers_nft_and_persists() -> None:
    d = decide(BOTH, "auto", None, STATE)
    assert (d.choice.name, d.write, d.choice.persisted) == (NFTABLES, True, False)
    assert "no rules" in d.choice.evidence


def test_auto_follows_legacy_rules_on_the_host() -> None:
    d = decide(LEGACY_IN_USE, "auto", None, STATE)
    assert d.choice.name == LEGACY and d.write
    assert "KUBE-POSTROUTING" in d.choice.evidence


def test_auto_follows_existing_istio_ipsets() -> None:
    det = HostDetection(istio_ipsets=("istio-inpod-probes-v4",), legacy_usable=True, nft_usable=True)
    assert decide(det, "auto", None, STATE).choice.name == LEGACY


def test_auto_reports_nft_rules_as_evidence() -> None:
    det = HostDetection(nft_rules=("ip filter/INPUT",), legacy_usable=True, nft_usable=True)
    d = decide(det, "auto", None, STATE)
    assert d.choice.name == NFTABLES and "ip filter/INPUT" in d.choice.evidence


def test_auto_falls_back_to_whatever_works() -> None:
    only_legacy = HostDetection(legacy_usable=True, nft_usable=False, nft_detail="no nf_tables")
    assert decide(only_legacy, "auto", None, STATE).choice.name == LEGACY
    legacy_rules_but_broken = HostDetection(legacy_rules=("x: -A X",), legacy_usable=False, nft_usable=True)
    assert decide(legacy_rules_but_broken, "auto", None, STATE).choice.name == NFTABLES
    with pytest.raises(BackendError, match="no usable rule backend"):
        decide(HostDetection(), "auto", None, STATE)


def test_persisted_choice_is_reused_even_if_detection_now_says_otherwise() -> None:
    d = decide(LEGACY_IN_USE, "auto", NFTABLES, STATE)  # e.g. legacy rules appeared since: no flip
    assert (d.choice.name, d.write, d.choice.persisted) == (NFTABLES, False, True)
    d = decide(BOTH, "auto", LEGACY, STATE)
    assert (d.choice.name, d.choice.persisted) == (LEGACY, True)


def test_persisted_choice_that_stopped_working_is_loud() -> None:
    det = HostDetection(legacy_usable=True, nft_usable=False, nft_detail="nft: JSON support not compiled-in")
    with pytest.raises(BackendError) as info:
        decide(det, "auto", NFTABLES, STATE)
    msg = str(info.value)
    assert STATE in msg and "JSON support not compiled-in" in msg
    assert "--rules-backend iptables-legacy" in msg  # says what to do


def test_explicit_override_rewrites_and_warns() -> None:
    d = decide(BOTH, LEGACY, NFTABLES, STATE)
    assert (d.choice.name, d.write, d.choice.persisted) == (LEGACY, True, False)
    assert d.warning is not None and "override" in d.warning
    same = decide(BOTH, LEGACY, LEGACY, STATE)
    assert not same.write and same.warning is None
    fresh = decide(BOTH, NFTABLES, None, STATE)
    assert fresh.write and fresh.warning is None


def test_explicit_backend_that_does_not_work_is_refused() -> None:
    with pytest.raises(BackendError, match="requested but does not work"):
        decide(HostDetection(legacy_usable=True), NFTABLES, None, STATE)


def test_bad_inputs() -> None:
    with pytest.raises(BackendError, match="not one of"):
        decide(BOTH, "iptables-nft", None, STATE)
    with pytest.raises(BackendError, match="not a known rule backend"):
        decide(BOTH, "auto", "garbage", STATE)


def test_only_real_rules_count_in_iptables_save() -> None:
    empty_tables = ("# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
                    "-N KUBE-X\nCOMMIT\n")
    assert legacy_rules_from_save(empty_tables, "ip6tables-legacy-save") == []
    dump = empty_tables.replace("COMMIT", "-A POSTROUTING -j KUBE-X\nCOMMIT")
    assert legacy_rules_from_save(dump, "iptables-legacy-save") == [
        "iptables-legacy-save nat: -A POSTROUTING -j KUBE-X"
    ]


def test_only_real_rules_count_in_nft_listing() -> None:
    listing = {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "ip", "name": "filter", "handle": 1}},
        {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "hook": "input", "handle": 1}},
    ]}
    assert nft_rules_from_listing(listing) == []
    listing["nftables"].append(
        {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "expr": [{"accept": None}]}})
    assert nft_rules_from_listing(listing) == ["ip filter/INPUT"]
