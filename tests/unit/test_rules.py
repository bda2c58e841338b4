"""Golden tests for the pure in-pod rule generator (redirect-rules.md §3-§4)."""

# ruff: noqa: E501  (golden rule text is copied verbatim from the spec; lines cannot be wrapped)

from __future__ import annotations

import pytest

from cni_agent.redirect.rules import (
    ANNOTATION_BYPASS_INBOUND,
    ANNOTATION_DNS_CAPTURE,
    ANNOTATION_REROUTE_INTERFACES,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
    RuleSettings,
    build_ruleset,
    parse_go_bool,
    render_iptables_restore,
    settings_from_annotations,
)
from cni_agent.testing.specblocks import (
    BLOCK_A,
    BLOCK_B_NAT,
    BLOCK_C_NAT,
    BLOCK_D_NAT,
    BLOCK_E_NAT,
)
from cni_agent.testing.specblocks import IPT_MANGLE as MANGLE
from cni_agent.testing.specblocks import IPT_RAW as RAW


def _v6(text: str) -> str:
    return text.replace("127.0.0.1/32", "::1/128").replace(PROBE_SNAT_IPV4, PROBE_SNAT_IPV6)


def test_block_a_byte_exact() -> None:
    assert render_iptables_restore(build_ruleset(RuleSettings())) == BLOCK_A


def test_block_b_ipv6_default() -> None:
    text = render_iptables_restore(build_ruleset(RuleSettings(), family=6))
    assert text == MANGLE + BLOCK_B_NAT + RAW
    assert text == _v6(BLOCK_A)


def test_block_c_bypass_inbound() -> None:
    rs = build_ruleset(RuleSettings(dns_capture=False, bypass_inbound=True))
    assert render_iptables_restore(rs) == MANGLE + BLOCK_C_NAT
    assert rs.chains_declared("nat") == ("ISTIO_OUTPUT", "ISTIO_PRERT")


def test_block_d_dns_off() -> None:
    rs = build_ruleset(RuleSettings(dns_capture=False))
    assert render_iptables_restore(rs) == MANGLE + BLOCK_D_NAT
    assert rs.tables() == ("mangle", "nat")


def test_block_e_reroute_interfaces() -> None:
    rs = build_ruleset(RuleSettings(dns_capture=False, reroute_interfaces=("net1", "net2")))
    assert render_iptables_restore(rs) == MANGLE + BLOCK_E_NAT


def test_combination_bypass_with_dns() -> None:
    """Block C plus rows 4, 5, 13-16 (spec §3 "Combinations")."""
    dns_nat = [
        "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
    ]
    lines = BLOCK_C_NAT.splitlines()
    at = lines.index("-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT") + 1
    expected_nat = "\n".join(lines[:at] + dns_nat + lines[at:]) + "\n"
    rs = build_ruleset(RuleSettings(dns_capture=True, bypass_inbound=True))
    assert render_iptables_restore(rs) == MANGLE + expected_nat + RAW


def test_combination_bypass_with_interfaces() -> None:
    """Interface rules come first, so `-N ISTIO_PRERT` precedes `-N ISTIO_OUTPUT` again."""
    expected_nat = """\
* nat
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -i net1 -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_PRERT -i net1 -p tcp -j RETURN
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
"""
    rs = build_ruleset(RuleSettings(dns_capture=False, bypass_inbound=True, reroute_interfaces=("net1",)))
    assert render_iptables_restore(rs) == MANGLE + expected_nat


@pytest.mark.parametrize(
    "settings",
    [
        RuleSettings(),
        RuleSettings(dns_capture=False),
        RuleSettings(bypass_inbound=True),
        RuleSettings(dns_capture=False, bypass_inbound=True, reroute_interfaces=("eth9", "net2")),
    ],
)
def test_invariants_across_variants(settings: RuleSettings) -> None:
    v4 = render_iptables_restore(build_ruleset(settings, 4))
    assert v4.startswith(MANGLE)  # mangle is identical in every variant
    assert (RAW in v4) == settings.dns_capture
    assert v4.endswith("COMMIT\n")
    assert render_iptables_restore(build_ruleset(settings, 6)) == _v6(v4)
    rows = [r.row for r in build_ruleset(settings).rules]
    assert rows == sorted(rows)  # generation order is the spec §4 row order


def test_rejects_unknown_family() -> None:
    with pytest.raises(ValueError):
        build_ruleset(RuleSettings(), family=5)


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_parsebool_true(value: str) -> None:
    assert parse_go_bool(value) is True


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_parsebool_false(value: str) -> None:
    assert parse_go_bool(value) is False


@pytest.mark.parametrize("value", ["", "yes", "tRUE", " true", "2", "on"])
def test_go_parsebool_invalid(value: str) -> None:
    assert parse_go_bool(value) is None


def test_annotations_absent_use_global_default() -> None:
    assert settings_from_annotations({}, dns_default=True) == (RuleSettings(dns_capture=True), [])
    assert settings_from_annotations({}, dns_default=False) == (RuleSettings(dns_capture=False), [])


def test_annotations_override_and_parse() -> None:
    settings, warnings = settings_from_annotations(
        {
            ANNOTATION_DNS_CAPTURE: "F",
            ANNOTATION_BYPASS_INBOUND: "1",
            ANNOTATION_REROUTE_INTERFACES: " net1, ,net2 ,,",
        },
        dns_default=True,
    )
    assert warnings == []
    assert settings == RuleSettings(dns_capture=False, bypass_inbound=True, reroute_interfaces=("net1", "net2"))
    on, _ = settings_from_annotations({ANNOTATION_DNS_CAPTURE: "true"}, dns_default=False)
    assert on.dns_capture is True


def test_annotations_invalid_bool_is_warned_and_absent() -> None:
    settings, warnings = settings_from_annotations(
        {ANNOTATION_DNS_CAPTURE: "yes", ANNOTATION_BYPASS_INBOUND: "maybe"}, dns_default=False
    )
    assert settings == RuleSettings(dns_capture=False, bypass_inbound=False)
    assert len(warnings) == 2
    assert any(ANNOTATION_DNS_CAPTURE in w and "'yes'" in w for w in warnings)


def test_annotations_bad_interface_names_skipped() -> None:
    settings, warnings = settings_from_annotations(
        {ANNOTATION_REROUTE_INTERFACES: "net1,bad name,a/b,waytoolonginterfacename,net2"}, dns_default=True
    )
    assert settings.reroute_interfaces == ("net1", "net2")
    assert len(warnings) == 3


@pytest.mark.parametrize("name", ["abcdefghijklmn\u00e9", "@mine", "a" * 16])
def test_reroute_interface_names_count_bytes_and_refuse_set_syntax(name: str) -> None:
    """IFNAMSIZ is 16 bytes with the NUL: a 15-character name with one accent is 16 bytes."""
    from cni_agent.redirect.rules import ANNOTATION_REROUTE_INTERFACES, settings_from_annotations

    settings, warnings = settings_from_annotations({ANNOTATION_REROUTE_INTERFACES: f"net1,{name}"}, True)
    assert settings.reroute_interfaces == ("net1",)
    assert warnings and name in warnings[0]
