"""Golden tests for the nft form of the in-pod rules (redirect-rules.md §5, Blocks F-J), pure."""

# ruff: noqa: E501  (golden rule text is copied verbatim from the spec; lines cannot be wrapped)

from __future__ import annotations

import json

import pytest

from cni_agent.redirect.rules import (
    NFT_TABLE_MANGLE,
    NFT_TABLE_NAT,
    NFT_TABLE_RAW,
    NftTableState,
    RuleSettings,
    build_ruleset,
    canonical_expr,
    nft_json,
    nft_live_state,
    nft_rules,
    nft_wanted_state,
    render_nft,
    render_nft_delete,
)
from cni_agent.testing.specblocks import (
    BLOCK_F,
    BLOCK_G_NAT_RULES,
    BLOCK_H_NAT_RULES,
    BLOCK_I_NAT_RULES,
    BLOCK_J_NAT_RULES,
    RAW_LEFTOVER_DELETE,
)


def _norm(text: str) -> list[str]:
    """Spec §5: nft ignores whitespace, compare after normalising spaces."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _section(block: str, table: str) -> str:
    """The lines of one table in Block F (add table ... up to the next add table)."""
    out, inside = [], False
    for line in block.splitlines(keepends=True):
        if line.startswith("add table "):
            inside = line.split()[-1] == table
        if inside:
            out.append(line)
    return "".join(out)


NAT_HEADER = "".join(_section(BLOCK_F, NFT_TABLE_NAT).splitlines(keepends=True)[:8])
MANGLE = _section(BLOCK_F, NFT_TABLE_MANGLE)
RAW = _section(BLOCK_F, NFT_TABLE_RAW)


def test_block_f_ipv4_default() -> None:
    assert _norm(render_nft([build_ruleset(RuleSettings(), 4)])) == _norm(BLOCK_F)


def test_block_f_sections_are_what_the_helpers_think() -> None:
    # guards the test helpers themselves: F = nat + mangle + raw, nat header = 8 lines
    assert _norm(BLOCK_F) == _norm(_section(BLOCK_F, NFT_TABLE_NAT) + MANGLE + RAW)
    assert _norm(NAT_HEADER)[-1] == "add rule inet istio-ambient-nat prerouting jump istio-prerouting"


def test_block_g_ipv6_merged_into_inet() -> None:
    rendered = render_nft([build_ruleset(RuleSettings(), 4), build_ruleset(RuleSettings(), 6)])
    assert _norm(rendered) == _norm(NAT_HEADER + BLOCK_G_NAT_RULES + MANGLE + RAW)


def test_block_h_bypass_dns_off() -> None:
    s = RuleSettings(dns_capture=False, bypass_inbound=True)
    rendered = render_nft([build_ruleset(s, 4)])
    assert _norm(rendered) == _norm(NAT_HEADER + BLOCK_H_NAT_RULES + MANGLE + RAW_LEFTOVER_DELETE)


def test_block_i_dns_off_removes_leftover_raw() -> None:
    rendered = render_nft([build_ruleset(RuleSettings(dns_capture=False), 4)])
    assert _norm(rendered) == _norm(NAT_HEADER + BLOCK_I_NAT_RULES + MANGLE + RAW_LEFTOVER_DELETE)
    assert _norm(rendered)[-2:] == _norm(RAW_LEFTOVER_DELETE)  # the §5 MUST: after nat and mangle


def test_block_j_virtual_interfaces() -> None:
    s = RuleSettings(dns_capture=False, reroute_interfaces=("net1", "net2"))
    rendered = render_nft([build_ruleset(s, 4)])
    assert _norm(rendered) == _norm(NAT_HEADER + BLOCK_J_NAT_RULES + MANGLE + RAW_LEFTOVER_DELETE)


def test_block_j_with_ipv6_keeps_interface_rules_once() -> None:
    s = RuleSettings(dns_capture=False, reroute_interfaces=("net1",))
    text = render_nft([build_ruleset(s, 4), build_ruleset(s, 6)])
    assert text.count("iifname net1") == 2  # redirect + return, not doubled per family
    assert text.count("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff") == 1


def test_delete_text() -> None:
    assert render_nft_delete() == (
        "add table inet istio-ambient-nat\ndelete table inet istio-ambient-nat\n"
        "add table inet istio-ambient-mangle\ndelete table inet istio-ambient-mangle\n"
        "add table inet istio-ambient-raw\ndelete table inet istio-ambient-raw\n"
    )


VARIANTS = [
    RuleSettings(),
    RuleSettings(dns_capture=False),
    RuleSettings(bypass_inbound=True),
    RuleSettings(dns_capture=True, bypass_inbound=True, reroute_interfaces=("net1", "eth9")),
]


@pytest.mark.parametrize("settings", VARIANTS)
@pytest.mark.parametrize("families", [(4,), (4, 6)])
def test_json_mirrors_text_command_for_command(settings: RuleSettings, families: tuple[int, ...]) -> None:
    rulesets = [build_ruleset(settings, f) for f in families]
    lines = render_nft(rulesets).splitlines()
    cmds = nft_json(rulesets)["nftables"]
    assert len(lines) == len(cmds)
    for line, cmd in zip(lines, cmds, strict=True):
        verb, obj = line.split()[0], line.split()[1]
        assert list(cmd) == [verb]
        assert list(cmd[verb]) == [obj]
        body = cmd[verb][obj]
        assert body["family"] == "inet"
        tokens = line.split()
        assert (body["name"] if obj == "table" else body["table"]) == tokens[3]
        if obj in ("chain", "rule"):
            assert body["name" if obj == "chain" else "chain"] == tokens[4]
    json.dumps(cmds)  # serialisable as is


def test_rules_carry_rows_and_families() -> None:
    rules = nft_rules([build_ruleset(RuleSettings(), 4), build_ruleset(RuleSettings(), 6)])
    twins = [(r.row, r.family) for r in rules if r.row == 19]
    assert twins == [(19, 4), (19, 6)]
    assert all(r.family is None for r in rules if r.row in (13, 17))


def test_merging_different_settings_is_refused() -> None:
    with pytest.raises(ValueError, match="different settings"):
        nft_rules([build_ruleset(RuleSettings(), 4), build_ruleset(RuleSettings(dns_capture=False), 6)])


# --- live-state comparison (pure part of `NftablesBackend.matches`) -------------------------------


def _fake_listing(rulesets: list[object], *, mutate: object = None) -> dict[str, object]:
    """What `nft -j list ruleset` returns after our JSON was applied: handles, counters, nft's folding."""
    doc = nft_json(rulesets)  # type: ignore[arg-type]
    out: list[dict[str, object]] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
    handle = 0
    deleted = {c["delete"]["table"]["name"] for c in doc["nftables"] if "delete" in c}
    for cmd in doc["nftables"]:
        if "add" not in cmd:
            continue
        kind, body = next(iter(cmd["add"].items()))
        if (body.get("table") or body.get("name")) in deleted:
            continue
        handle += 1
        body = json.loads(json.dumps(body))
        body["handle"] = handle
        if kind == "rule":
            for st in body["expr"]:
                if "counter" in st:
                    st["counter"] = {"packets": 7, "bytes": 420}
                if "mangle" in st and isinstance(st["mangle"]["value"], dict) and "|" in st["mangle"]["value"]:
                    inner = st["mangle"]["value"]["|"]
                    inner[0]["&"][1] |= inner[1]  # nft lists `& 0xfffff000 | 0x111` as `& 0xfffff111 | 0x111`
        out.append({kind: body})
    return {"nftables": out}


def test_live_state_equals_wanted_despite_handles_counters_folding() -> None:
    rulesets = [build_ruleset(RuleSettings(), 4), build_ruleset(RuleSettings(), 6)]
    assert nft_live_state(_fake_listing(rulesets)) == nft_wanted_state(rulesets)
    assert set(nft_wanted_state(rulesets)) == {NFT_TABLE_NAT, NFT_TABLE_MANGLE, NFT_TABLE_RAW}


def test_live_state_detects_stray_missing_and_foreign_objects() -> None:
    rulesets = [build_ruleset(RuleSettings(dns_capture=False), 4)]
    wanted = nft_wanted_state(rulesets)
    listing = _fake_listing(rulesets)
    objs = listing["nftables"]
    assert isinstance(objs, list)
    assert NFT_TABLE_RAW not in wanted

    stray = {"rule": {"family": "inet", "table": NFT_TABLE_NAT, "chain": "istio-output", "handle": 99,
                      "expr": [{"accept": None}]}}
    assert nft_live_state({"nftables": [*objs, stray]}) != wanted
    rules = [o for o in objs if "rule" in o]
    assert nft_live_state({"nftables": [o for o in objs if o is not rules[-1]]}) != wanted
    a_set = {"set": {"family": "inet", "table": NFT_TABLE_MANGLE, "name": "x", "type": "ipv4_addr", "handle": 5}}
    assert nft_live_state({"nftables": [*objs, a_set]}) != wanted
    leftover_raw = {"table": {"family": "inet", "name": NFT_TABLE_RAW, "handle": 9}}
    assert nft_live_state({"nftables": [*objs, leftover_raw]}) != wanted
    # foreign tables and other families are not ours and do not matter
    foreign = [{"table": {"family": "ip", "name": NFT_TABLE_NAT, "handle": 3}},
               {"rule": {"family": "inet", "table": "filter", "chain": "input", "expr": [{"drop": None}]}}]
    assert nft_live_state({"nftables": [*objs, *foreign]}) == wanted


def test_reordered_rules_are_a_mismatch() -> None:
    rulesets = [build_ruleset(RuleSettings(), 4)]
    objs = list(_fake_listing(rulesets)["nftables"])  # type: ignore[call-overload]
    idx = [i for i, o in enumerate(objs) if "rule" in o and o["rule"]["chain"] == "istio-output"
           and o["rule"]["table"] == NFT_TABLE_NAT]
    objs[idx[0]], objs[idx[1]] = objs[idx[1]], objs[idx[0]]
    assert nft_live_state({"nftables": objs}) != nft_wanted_state(rulesets)


def test_canonical_expr_folds_ct_mark_and_zeroes_counters() -> None:
    a = [{"counter": {"packets": 1, "bytes": 2}},
         {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"&": [{"ct": {"key": "mark"}}, 0xFFFFF000]}, 0x111]}}}]
    b = [{"counter": {"packets": 0, "bytes": 0}},
         {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"&": [{"ct": {"key": "mark"}}, 0xFFFFF111]}, 0x111]}}}]
    assert canonical_expr(a) == canonical_expr(b)
    c = [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"&": [{"ct": {"key": "mark"}}, 0xFFFFF000]}, 0x222]}}}]
    assert canonical_expr(c) != canonical_expr(b[1:])
    assert NftTableState(chains=(), rules=()) == NftTableState(chains=(), rules=(), other=())


def test_probe_snat_address_is_the_nodes_setting_in_both_forms() -> None:
    """Spec agent-behaviour §15.8: the probe source is configurable; each family keeps its own."""
    from cni_agent.redirect.rules import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6, render_iptables_restore

    v4 = build_ruleset(RuleSettings(), 4, "169.254.99.1")
    v6 = build_ruleset(RuleSettings(), 6, "fd00:5a:7::1")
    ipt = render_iptables_restore(v4)
    assert "-A ISTIO_PRERT -s 169.254.99.1 -p tcp -m tcp -j ACCEPT" in ipt
    assert "-A ISTIO_OUTPUT -d 169.254.99.1 -p tcp -m tcp -j ACCEPT" in ipt
    assert PROBE_SNAT_IPV4 not in ipt
    nft = render_nft([v4, v6])
    assert "ip saddr 169.254.99.1 counter accept" in nft and "ip6 saddr fd00:5a:7::1 counter accept" in nft
    assert "ip daddr 169.254.99.1 counter accept" in nft and "ip6 daddr fd00:5a:7::1 counter accept" in nft
    assert PROBE_SNAT_IPV4 not in nft and PROBE_SNAT_IPV6 not in nft
    # the default is the spec's address
    assert build_ruleset(RuleSettings(), 4) == build_ruleset(RuleSettings(), 4, PROBE_SNAT_IPV4)


@pytest.mark.parametrize("address,family", [("fd00::1", 4), ("169.254.1.1", 6), ("10.0.0.0/8", 4),
                                            ("0.0.0.0", 4), ("::1", 6), ("224.0.0.1", 4)])
def test_unusable_probe_snat_address_is_refused(address: str, family: int) -> None:
    with pytest.raises(ValueError, match=r"address|probe source|not an IP"):
        build_ruleset(RuleSettings(), family, address)
