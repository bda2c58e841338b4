"""In-pod redirect rules as data (pure).

The rule text, chain names and their order are a compatibility surface: operators, tools and ztunnel
assume them (spec: redirect-rules.md §2-§4). Keeping them as plain data, apart from any backend, lets
golden tests pin the exact bytes while the kernel backends (python-iptables today, nftables later)
translate the same tuples. Nothing here touches the system.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- constants (spec §2) -------------------------------------------------------------------------

ZTUNNEL_MARK = 0x539
"""SO_MARK on every ztunnel socket; REDIRECTs skip it."""
CONNMARK = 0x111
"""Connmark set on ztunnel's spoofed inbound packets; app replies are routed back with it."""
MARK_MASK = 0xFFF
RESTORE_MASK = 0xFFFFFFFF
NFT_CT_KEEP_MASK = 0xFFFFF000

ZTUNNEL_MARK_SPEC = f"{ZTUNNEL_MARK:#x}/{MARK_MASK:#x}"  # "0x539/0xfff"
CONNMARK_SPEC = f"{CONNMARK:#x}/{MARK_MASK:#x}"  # "0x111/0xfff"
RESTORE_MASK_SPEC = f"{RESTORE_MASK:#x}"  # "0xffffffff"

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
DNS_CAPTURE_PORT = 15053
DNS_PORT = 53
DNS_CT_ZONE = 1

ROUTE_TABLE = 100
RULE_PRIORITY = 32764

PROBE_SNAT_IPV4 = "169.254.7.127"
PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
PROBE_SET_V4 = "istio-inpod-probes-v4"
PROBE_SET_V6 = "istio-inpod-probes-v6"

CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
HOST_CHAIN_POSTRT = "ISTIO_POSTRT"
OUR_CHAINS: tuple[str, ...] = (CHAIN_PRERT, CHAIN_OUTPUT)

TABLE_MANGLE = "mangle"
TABLE_NAT = "nat"
TABLE_RAW = "raw"
OUR_TABLES: tuple[str, ...] = (TABLE_MANGLE, TABLE_NAT, TABLE_RAW)

NFT_TABLE_NAT = "istio-ambient-nat"
NFT_TABLE_MANGLE = "istio-ambient-mangle"
NFT_TABLE_RAW = "istio-ambient-raw"

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
"""Chains every iptables table may own; never declared with -N."""

NON_CHAIN_TARGETS = frozenset(
    {"ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "LOG", "REDIRECT", "CONNMARK", "CT", "MARK",
     "SNAT", "DNAT", "MASQUERADE", "TPROXY"}
)
"""Targets that are extensions or verdicts; any other `-j X` is a jump to a user chain."""

JUMPS_DELETE_ORDER: tuple[tuple[str, str, str], ...] = (
    (TABLE_MANGLE, "PREROUTING", CHAIN_PRERT),
    (TABLE_MANGLE, "OUTPUT", CHAIN_OUTPUT),
    (TABLE_NAT, "OUTPUT", CHAIN_OUTPUT),
    (TABLE_RAW, "PREROUTING", CHAIN_PRERT),
    (TABLE_RAW, "OUTPUT", CHAIN_OUTPUT),
    (TABLE_NAT, "PREROUTING", CHAIN_PRERT),
)
"""(table, builtin chain, our chain) jumps removed first on deletion (spec §8 step 1)."""

CHAINS_DELETE_ORDER: tuple[tuple[str, str], ...] = tuple(
    (table, chain) for table in OUR_TABLES for chain in (CHAIN_PRERT, CHAIN_OUTPUT)
)
"""(table, chain) flushed then deleted, in this order (spec §8 steps 2-3)."""

ANNOTATION_DNS_CAPTURE = "ambient.istio.io/dns-capture"
ANNOTATION_BYPASS_INBOUND = "ambient.istio.io/bypass-inbound-capture"
ANNOTATION_REROUTE_INTERFACES = "istio.io/reroute-virtual-interfaces"

_IFNAMSIZ = 16


def loopback_cidr(family: int) -> str:
    """The family's loopback host prefix as iptables spells it in our rules."""
    return "127.0.0.1/32" if _check_family(family) == 4 else "::1/128"


def probe_snat_address(family: int) -> str:
    """The default link-local (v4) / ULA (v6) source the host SNATs kubelet probes to."""
    return PROBE_SNAT_IPV4 if _check_family(family) == 4 else PROBE_SNAT_IPV6


def check_probe_snat(address: str, family: int) -> str:
    """A usable probe SNAT source for `family`, in canonical text; ValueError says why not.

    Configurable (spec agent-behaviour §15.8): it appears in the host SNAT rule and in every pod's
    accept rules, so it must be one unicast address of the right family that no pod or node owns.
    """
    try:
        addr = ipaddress.ip_address(address.strip())
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address") from None
    if addr.version != _check_family(family):
        raise ValueError(f"{address!r} is not an IPv{family} address")
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast or (family == 4 and addr.is_reserved):
        raise ValueError(f"{address!r} cannot be a probe source (unspecified, loopback, multicast, reserved)")
    if isinstance(addr, ipaddress.IPv6Address) and (addr.scope_id or addr.ipv4_mapped):
        raise ValueError(f"{address!r}: use a plain IPv6 address (no zone, not v4-mapped)")
    return str(addr)


def _check_family(family: int) -> int:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, got {family!r}")
    return family


# --- per-pod settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSettings:
    """The per-pod knobs that change the rule set (spec §3 variants)."""

    dns_capture: bool = True
    bypass_inbound: bool = False
    reroute_interfaces: tuple[str, ...] = ()


_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_go_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool, because the reference reads these annotations with it; None = invalid."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _valid_ifname(name: str) -> bool:
    """Linux interface name rules (IFNAMSIZ counts BYTES, with the NUL); rejecting others keeps odd
    annotation text out of rule tokens. A leading `@` is refused too: nft reads it as a set reference,
    so the nftables backend could not express the rule."""
    return (
        0 < len(name.encode()) < _IFNAMSIZ
        and name not in (".", "..")
        and not name.startswith("@")
        and all(c.isprintable() and not c.isspace() and c not in "/:!" for c in name)
    )


def settings_from_annotations(
    annotations: Mapping[str, str], dns_default: bool
) -> tuple[RuleSettings, list[str]]:
    """Read the pod's overrides; invalid values are reported and treated as absent (never fatal)."""
    warnings: list[str] = []

    def read_bool(key: str) -> bool | None:
        raw = annotations.get(key)
        if raw is None:
            return None
        parsed = parse_go_bool(raw)
        if parsed is None:
            warnings.append(f"annotation {key}={raw!r} is not a valid bool; ignored")
        return parsed

    dns = read_bool(ANNOTATION_DNS_CAPTURE)
    bypass = read_bool(ANNOTATION_BYPASS_INBOUND)

    interfaces: list[str] = []
    raw_ifaces = annotations.get(ANNOTATION_REROUTE_INTERFACES)
    if raw_ifaces is not None:
        for item in raw_ifaces.split(","):
            name = item.strip()
            if not name:
                continue
            if not _valid_ifname(name):
                warnings.append(
                    f"annotation {ANNOTATION_REROUTE_INTERFACES}: {name!r} is not a valid interface name;"
                    " skipped"
                )
                continue
            interfaces.append(name)

    settings = RuleSettings(
        dns_capture=dns_default if dns is None else dns,
        bypass_inbound=bool(bypass),
        reroute_interfaces=tuple(interfaces),
    )
    return settings, warnings


# --- rule model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One `-A <chain> <spec...>` line; `spec` is the iptables token list after the chain name.

    `row` is the spec §4 generation row that produced the rule; it lets other backends (nft) map
    rules by meaning instead of parsing tokens. It does not take part in equality.
    """

    table: str
    chain: str
    spec: tuple[str, ...]
    row: int = field(default=0, compare=False)

    @property
    def jump_target(self) -> str | None:
        """The user chain this rule jumps to, if its target is a chain rather than an extension."""
        target = _target_of(self.spec)
        if target is None or target in NON_CHAIN_TARGETS:
            return None
        return target

    def render(self) -> str:
        return " ".join(("-A", self.chain, *self.spec))


def _target_of(spec: tuple[str, ...]) -> str | None:
    for i, token in enumerate(spec[:-1]):
        if token in ("-j", "-g"):
            return spec[i + 1]
    return None


@dataclass(frozen=True)
class RuleSet:
    """All rules for one address family, in generation order."""

    family: int
    rules: tuple[Rule, ...]

    def tables(self) -> tuple[str, ...]:
        """Tables with at least one rule, alphabetical (the restore-input order)."""
        return tuple(sorted({r.table for r in self.rules}))

    def rules_in(self, table: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.table == table)

    def chains_declared(self, table: str) -> tuple[str, ...]:
        """Non-builtin chains in `-N` order: owners of rules by first rule, then undeclared jump targets."""
        return self._declared.get(table, ())

    def chain_rules(self, table: str, chain: str) -> tuple[Rule, ...]:
        return self._by_chain.get((table, chain), ())

    def builtin_chains_used(self, table: str) -> tuple[str, ...]:
        """Builtin chains of `table` that hold rules of ours (our jumps), in rule order."""
        return tuple(c for t, c in self._by_chain if t == table and c in BUILTIN_CHAINS)

    # Indexes computed once per rule set: backends ask these per table and chain for every pod, and
    # rule sets are cached and shared (cached_property writes the instance dict; fields stay frozen).

    @functools.cached_property
    def _by_chain(self) -> dict[tuple[str, str], tuple[Rule, ...]]:
        index: dict[tuple[str, str], list[Rule]] = {}
        for r in self.rules:
            index.setdefault((r.table, r.chain), []).append(r)
        return {key: tuple(rules) for key, rules in index.items()}

    @functools.cached_property
    def _declared(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for table in {r.table for r in self.rules}:
            declared: list[str] = []
            rules = self.rules_in(table)
            for r in rules:
                if r.chain not in BUILTIN_CHAINS and r.chain not in declared:
                    declared.append(r.chain)
            for r in rules:
                target = r.jump_target
                if target is not None and target not in BUILTIN_CHAINS and target not in declared:
                    declared.append(target)
            out[table] = tuple(declared)
        return out


@functools.lru_cache(maxsize=256)
def cached_ruleset(settings: RuleSettings, family: int, probe_snat: str | None = None) -> RuleSet:
    """`build_ruleset`, once per variant: the agent asks for every pod, and a shared instance keeps
    its indexes (and the backends' per-rule-set caches) warm."""
    return build_ruleset(settings, family, probe_snat)


def build_ruleset(settings: RuleSettings, family: int = 4, probe_snat: str | None = None) -> RuleSet:
    """Generate the rules of spec §4 in its row order; conditions decide which rows appear.

    `probe_snat`: the node's probe SNAT source for this family (default: the spec's address).
    """
    _check_family(family)
    lo = loopback_cidr(family)
    snat = probe_snat_address(family) if probe_snat is None else check_probe_snat(probe_snat, family)
    dns = settings.dns_capture
    bypass = settings.bypass_inbound
    not_ztunnel = ("-m", "mark", "!", "--mark", ZTUNNEL_MARK_SPEC)
    rules: list[Rule] = []

    def add(row: int, table: str, chain: str, *spec: str) -> None:
        rules.append(Rule(table, chain, tuple(spec), row))

    add(1, TABLE_MANGLE, "PREROUTING", "-j", CHAIN_PRERT)
    add(2, TABLE_MANGLE, "OUTPUT", "-j", CHAIN_OUTPUT)
    add(3, TABLE_NAT, "OUTPUT", "-j", CHAIN_OUTPUT)
    if dns:
        add(4, TABLE_RAW, "PREROUTING", "-j", CHAIN_PRERT)
        add(5, TABLE_RAW, "OUTPUT", "-j", CHAIN_OUTPUT)
    add(6, TABLE_NAT, "PREROUTING", "-j", CHAIN_PRERT)
    for ifname in settings.reroute_interfaces:
        add(7, TABLE_NAT, CHAIN_PRERT, "-i", ifname, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
            str(OUTBOUND_PORT))
        add(7, TABLE_NAT, CHAIN_PRERT, "-i", ifname, "-p", "tcp", "-j", "RETURN")
    add(8, TABLE_MANGLE, CHAIN_PRERT, "-m", "mark", "--mark", ZTUNNEL_MARK_SPEC,
        "-j", "CONNMARK", "--set-xmark", CONNMARK_SPEC)
    if not bypass:
        add(9, TABLE_NAT, CHAIN_PRERT, "-s", snat, "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
    add(10, TABLE_NAT, CHAIN_OUTPUT, "-d", snat, "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
    if not bypass:
        add(11, TABLE_NAT, CHAIN_PRERT, "!", "-d", lo, "-p", "tcp", "!", "--dport", str(INBOUND_HBONE_PORT),
            *not_ztunnel, "-j", "REDIRECT", "--to-ports", str(INBOUND_PLAINTEXT_PORT))
    add(12, TABLE_MANGLE, CHAIN_OUTPUT, "-m", "connmark", "--mark", CONNMARK_SPEC,
        "-j", "CONNMARK", "--restore-mark", "--nfmask", RESTORE_MASK_SPEC, "--ctmask", RESTORE_MASK_SPEC)
    if dns:
        add(13, TABLE_NAT, CHAIN_OUTPUT, "!", "-o", "lo", "-p", "udp", *not_ztunnel,
            "-m", "udp", "--dport", str(DNS_PORT), "-j", "REDIRECT", "--to-port", str(DNS_CAPTURE_PORT))
        add(14, TABLE_NAT, CHAIN_OUTPUT, "!", "-d", lo, "-p", "tcp", "--dport", str(DNS_PORT),
            *not_ztunnel, "-j", "REDIRECT", "--to-ports", str(DNS_CAPTURE_PORT))
        add(15, TABLE_RAW, CHAIN_OUTPUT, "-p", "udp", "-m", "mark", "--mark", ZTUNNEL_MARK_SPEC,
            "-m", "udp", "--dport", str(DNS_PORT), "-j", "CT", "--zone", str(DNS_CT_ZONE))
        add(16, TABLE_RAW, CHAIN_PRERT, "-p", "udp", *not_ztunnel,
            "-m", "udp", "--sport", str(DNS_PORT), "-j", "CT", "--zone", str(DNS_CT_ZONE))
    add(17, TABLE_NAT, CHAIN_OUTPUT, "-p", "tcp", "-m", "mark", "--mark", CONNMARK_SPEC, "-j", "ACCEPT")
    add(18, TABLE_NAT, CHAIN_OUTPUT, "!", "-d", lo, "-o", "lo", "-j", "ACCEPT")
    add(19, TABLE_NAT, CHAIN_OUTPUT, "!", "-d", lo, "-p", "tcp", *not_ztunnel,
        "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT))
    return RuleSet(family=family, rules=tuple(rules))


def render_iptables_restore(rs: RuleSet) -> str:
    """The `iptables-restore --noflush` input for one family (spec §3 format facts)."""
    lines: list[str] = []
    for table in rs.tables():
        lines.append(f"* {table}")
        lines.extend(f"-N {chain}" for chain in rs.chains_declared(table))
        lines.extend(r.render() for r in rs.rules_in(table))
        lines.append("COMMIT")
    return "".join(f"{line}\n" for line in lines)


# --- nftables form (spec §5) -----------------------------------------------------------------------
#
# Each spec §4 row maps to one nft rule (or a v4 rule immediately followed by its v6 twin). Every
# rule is built from parts that carry BOTH their text (for the golden `nft -f` form) and their JSON
# expression in the canonical shape `nft -j list` prints back, so the applied JSON, the golden text
# and the live-state comparison all come from the same data.

NftExpr = dict[str, Any]
"""One statement of an nft JSON rule (`{"match": ...}`, `{"counter": ...}`, ...)."""

NFT_FAMILY = "inet"
NFT_CHAIN_PRERT = "istio-prerouting"
NFT_CHAIN_OUTPUT = "istio-output"
NFT_TABLES: tuple[str, ...] = (NFT_TABLE_NAT, NFT_TABLE_MANGLE, NFT_TABLE_RAW)
"""Our in-pod tables in transaction order (spec §5: nat, mangle, raw)."""

NFT_TABLE_OF: Mapping[str, str] = {
    TABLE_NAT: NFT_TABLE_NAT, TABLE_MANGLE: NFT_TABLE_MANGLE, TABLE_RAW: NFT_TABLE_RAW,
}
NFT_CHAIN_OF: Mapping[str, str] = {
    "PREROUTING": "prerouting", "OUTPUT": "output",
    CHAIN_PRERT: NFT_CHAIN_PRERT, CHAIN_OUTPUT: NFT_CHAIN_OUTPUT,
}


@dataclass(frozen=True)
class NftBaseChain:
    """A hooked chain: `{ type <type> hook <hook> priority <prio> ; }` (spec §5 table)."""

    name: str
    type: str
    hook: str
    prio: int

    def json(self, table: str) -> NftExpr:
        return {"family": NFT_FAMILY, "table": table, "name": self.name, "type": self.type,
                "hook": self.hook, "prio": self.prio, "policy": "accept"}

    def text(self, table: str) -> str:
        return (f"add chain {NFT_FAMILY} {table} {self.name} "
                f"{{ type {self.type} hook {self.hook} priority {self.prio} ; }}")


NFT_BASE_CHAINS: Mapping[str, tuple[NftBaseChain, NftBaseChain]] = {
    NFT_TABLE_NAT: (NftBaseChain("prerouting", "nat", "prerouting", -100),
                    NftBaseChain("output", "nat", "output", -100)),
    NFT_TABLE_MANGLE: (NftBaseChain("prerouting", "filter", "prerouting", -150),
                       NftBaseChain("output", "route", "output", -150)),
    NFT_TABLE_RAW: (NftBaseChain("prerouting", "filter", "prerouting", -300),
                    NftBaseChain("output", "filter", "output", -300)),
}
NFT_REGULAR_CHAINS: tuple[str, ...] = (NFT_CHAIN_PRERT, NFT_CHAIN_OUTPUT)

_Part = tuple[str, NftExpr]


@dataclass(frozen=True)
class NftRule:
    """One `add rule inet <table> <chain> ...`; `row` = spec §4 row, `family` None = both families."""

    table: str
    chain: str
    row: int
    family: int | None
    parts: tuple[_Part, ...]

    def text(self) -> str:
        return " ".join(("add rule", NFT_FAMILY, self.table, self.chain, *(p[0] for p in self.parts)))

    def expr(self) -> list[NftExpr]:
        return [p[1] for p in self.parts]

    def json(self) -> NftExpr:
        return {"family": NFT_FAMILY, "table": self.table, "chain": self.chain, "expr": self.expr()}


def _match(op: str, left: NftExpr, right: object) -> NftExpr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> NftExpr:
    return {"meta": {"key": key}}


def _ct(key: str) -> NftExpr:
    return {"ct": {"key": key}}


def _neg(negate: bool) -> str:
    return "!= " if negate else ""


def _op(negate: bool) -> str:
    return "!=" if negate else "=="


def _canonical_address(value: str) -> str:
    """nft lists a full-length prefix (`127.0.0.1/32`) as the bare address."""
    addr, _, length = value.partition("/")
    if length and int(length) == (128 if ":" in addr else 32):
        return addr
    return value


def _p_tcp() -> _Part:
    return "meta l4proto tcp", _match("==", _meta("l4proto"), "tcp")


def _p_addr(family: int, field_name: str, value: str, negate: bool = False) -> _Part:
    proto = "ip" if family == 4 else "ip6"
    return (f"{proto} {field_name} {_neg(negate)}{value}",
            _match(_op(negate), {"payload": {"protocol": proto, "field": field_name}},
                   _canonical_address(value)))


def _p_port(proto: str, field_name: str, port: int, negate: bool = False) -> _Part:
    return (f"{proto} {field_name} {_neg(negate)}{port}",
            _match(_op(negate), {"payload": {"protocol": proto, "field": field_name}}, port))


def _p_mark(spelling: str, mark: int, negate: bool) -> _Part:
    """`<spelling> 0xfff <op> <mark>`; the spec spells the same match three ways, kept verbatim."""
    return (f"{spelling} {MARK_MASK:#x} {_op(negate)} {mark:#x}",
            _match(_op(negate), {"&": [_meta("mark"), MARK_MASK]}, mark))


def _p_ifname(key: str, name: str, negate: bool = False) -> _Part:
    return f"{key} {_neg(negate)}{name}", _match(_op(negate), _meta(key), name)


def _p_counter() -> _Part:
    return "counter", {"counter": {"packets": 0, "bytes": 0}}


def _p_accept() -> _Part:
    return "accept", {"accept": None}


def _p_return() -> _Part:
    return "return", {"return": None}


def _p_redirect(port: int) -> _Part:
    return f"redirect to :{port}", {"redirect": {"port": port}}


def _p_jump(chain: str) -> _Part:
    return f"jump {chain}", {"jump": {"target": chain}}


def _p_ct_zone() -> _Part:
    return f"ct zone set {DNS_CT_ZONE}", {"mangle": {"key": _ct("zone"), "value": DNS_CT_ZONE}}


def _p_set_connmark() -> _Part:
    return (f"ct mark set ct mark & {NFT_CT_KEEP_MASK:#x} | {CONNMARK:#x}",
            {"mangle": {"key": _ct("mark"),
                        "value": {"|": [{"&": [_ct("mark"), NFT_CT_KEEP_MASK]}, CONNMARK]}}})


def _p_restore_mark() -> _Part:
    return "meta mark set ct mark", {"mangle": {"key": _meta("mark"), "value": _ct("mark")}}


def _p_connmark_match() -> _Part:
    return (f"ct mark and {MARK_MASK:#x} == {CONNMARK:#x}",
            _match("==", {"&": [_ct("mark"), MARK_MASK]}, CONNMARK))


def _option(rule: Rule, flag: str) -> str:
    return rule.spec[rule.spec.index(flag) + 1]


_FAMILY_SPECIFIC_ROWS = frozenset({9, 10, 11, 14, 18, 19})


def _nft_parts(rule: Rule, family: int) -> tuple[_Part, ...]:
    """The nft statements for one §4 row (spec §5 Blocks F-J), for `family` where it matters."""
    lo = loopback_cidr(family)
    row = rule.row
    if 1 <= row <= 6:
        target = rule.jump_target
        if target is None:
            raise ValueError(f"row {row} rule has no chain jump: {rule.render()!r}")
        return (_p_jump(NFT_CHAIN_OF[target]),)
    if row == 7:
        ifname = _option(rule, "-i")
        verdict = _p_return() if _target_of(rule.spec) == "RETURN" else _p_redirect(OUTBOUND_PORT)
        return (_p_ifname("iifname", ifname), _p_tcp(), _p_counter(), verdict)

    def not_ztunnel() -> _Part:
        return _p_mark("mark and", ZTUNNEL_MARK, negate=True)

    rows: dict[int, Callable[[], tuple[_Part, ...]]] = {  # lazily: only the asked-for row is built
        8: lambda: (_p_mark("meta mark &", ZTUNNEL_MARK, negate=False), _p_counter(), _p_set_connmark()),
        # the probe SNAT address is the node's setting: take it from the rule itself
        9: lambda: (_p_tcp(), _p_addr(family, "saddr", _option(rule, "-s")), _p_counter(), _p_accept()),
        10: lambda: (_p_tcp(), _p_addr(family, "daddr", _option(rule, "-d")), _p_counter(), _p_accept()),
        11: lambda: (_p_addr(family, "daddr", lo, negate=True),
                     _p_port("tcp", "dport", INBOUND_HBONE_PORT, negate=True), not_ztunnel(),
                     _p_counter(), _p_redirect(INBOUND_PLAINTEXT_PORT)),
        12: lambda: (_p_connmark_match(), _p_counter(), _p_restore_mark()),
        13: lambda: (_p_ifname("oifname", "lo", negate=True), not_ztunnel(),
                     _p_port("udp", "dport", DNS_PORT), _p_counter(), _p_redirect(DNS_CAPTURE_PORT)),
        14: lambda: (_p_addr(family, "daddr", lo, negate=True), _p_port("tcp", "dport", DNS_PORT),
                     not_ztunnel(), _p_counter(), _p_redirect(DNS_CAPTURE_PORT)),
        15: lambda: (_p_port("udp", "dport", DNS_PORT), _p_mark("meta mark and", ZTUNNEL_MARK, negate=False),
                     _p_counter(), _p_ct_zone()),
        16: lambda: (_p_port("udp", "sport", DNS_PORT), _p_mark("meta mark and", ZTUNNEL_MARK, negate=True),
                     _p_counter(), _p_ct_zone()),
        17: lambda: (_p_tcp(), _p_mark("mark and", CONNMARK, negate=False), _p_counter(), _p_accept()),
        18: lambda: (_p_ifname("oifname", "lo"), _p_addr(family, "daddr", lo, negate=True), _p_counter(),
                     _p_accept()),
        19: lambda: (_p_tcp(), _p_addr(family, "daddr", lo, negate=True), not_ztunnel(), _p_counter(),
                     _p_redirect(OUTBOUND_PORT)),
    }
    make = rows.get(row)
    if make is None:
        raise ValueError(f"rule has no spec §4 row: {rule.render()!r}")
    return make()


def nft_rules(rulesets: Sequence[RuleSet]) -> tuple[NftRule, ...]:
    """The merged `inet` rules for the given families (spec Block G: v6 twin right after its v4 rule).

    All rule sets must come from the same settings (same rows); family-neutral rows appear once.
    """
    if not rulesets:
        raise ValueError("no rule sets")
    by_family = {rs.family: rs for rs in rulesets}  # one rule set per family (the last if repeated)
    first = rulesets[0]
    shape = [(r.row, r.table, r.chain) for r in first.rules]
    for rs in rulesets[1:]:
        if [(r.row, r.table, r.chain) for r in rs.rules] != shape:
            raise ValueError("rule sets of different settings cannot be merged into one inet table")
    out: list[NftRule] = []
    for i, rule in enumerate(first.rules):
        table, chain = NFT_TABLE_OF[rule.table], NFT_CHAIN_OF[rule.chain]
        if rule.row in _FAMILY_SPECIFIC_ROWS:  # each family's twin from its own rule set (its addresses)
            out.extend(NftRule(table, chain, rule.row, fam, _nft_parts(rs.rules[i], fam))
                       for fam, rs in by_family.items())
        else:
            out.append(NftRule(table, chain, rule.row, None, _nft_parts(rule, first.family)))
    return tuple(out)


def _table_obj(table: str) -> NftExpr:
    return {"table": {"family": NFT_FAMILY, "name": table}}


def nft_commands(rulesets: Sequence[RuleSet]) -> list[tuple[str, NftExpr]]:
    """The apply transaction as (text line, JSON command) pairs, in spec §5 order."""
    rules = nft_rules(rulesets)
    cmds: list[tuple[str, NftExpr]] = []
    for table in NFT_TABLES:
        mine = [r for r in rules if r.table == table]
        cmds.append((f"add table {NFT_FAMILY} {table}", {"add": _table_obj(table)}))
        if not mine:  # e.g. raw with DNS capture off: remove a leftover (spec §5 MUST)
            cmds.append((f"delete table {NFT_FAMILY} {table}", {"delete": _table_obj(table)}))
            continue
        cmds.append((f"flush table {NFT_FAMILY} {table}", {"flush": _table_obj(table)}))
        for base in NFT_BASE_CHAINS[table]:
            cmds.append((base.text(table), {"add": {"chain": base.json(table)}}))
        for name in NFT_REGULAR_CHAINS:
            cmds.append((f"add chain {NFT_FAMILY} {table} {name}",
                         {"add": {"chain": {"family": NFT_FAMILY, "table": table, "name": name}}}))
        cmds.extend((r.text(), {"add": {"rule": r.json()}}) for r in mine)
    return cmds


def render_nft(rulesets: Sequence[RuleSet]) -> str:
    """The `nft -f` text of one pod's apply transaction (spec Blocks F-J); one line per command."""
    return "".join(f"{text}\n" for text, _ in nft_commands(rulesets))


def nft_json(rulesets: Sequence[RuleSet]) -> NftExpr:
    """The same transaction for libnftables' JSON API / `nft -j -f -`."""
    return {"nftables": [cmd for _, cmd in nft_commands(rulesets)]}


def _delete_commands() -> list[tuple[str, NftExpr]]:
    cmds: list[tuple[str, NftExpr]] = []
    for table in NFT_TABLES:
        cmds.append((f"add table {NFT_FAMILY} {table}", {"add": _table_obj(table)}))
        cmds.append((f"delete table {NFT_FAMILY} {table}", {"delete": _table_obj(table)}))
    return cmds


def render_nft_delete() -> str:
    """Spec §8 nft deletion: `add table` + `delete table` per table, so a missing table is no error."""
    return "".join(f"{text}\n" for text, _ in _delete_commands())


def nft_delete_json() -> NftExpr:
    return {"nftables": [cmd for _, cmd in _delete_commands()]}


def nft_replace_json(rulesets: Sequence[RuleSet]) -> NftExpr:
    """Delete-and-recreate in ONE transaction, for tables whose shape `flush` cannot repair.

    `flush table` keeps chains and sets; a stray chain or a base chain with another hook or priority
    survives it (and `add chain` with a different hook fails). Deleting first, in the same batch,
    keeps the swap atomic.
    """
    return {"nftables": [cmd for _, cmd in _delete_commands()] + [cmd for _, cmd in nft_commands(rulesets)]}


@dataclass(frozen=True)
class NftTableState:
    """A table's content reduced to what matters for equality: chains (with hook spec) and rules."""

    chains: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...]  # (chain, canonical exprs in chain order), by chain name
    other: tuple[str, ...] = ()  # any other object (set, map, flowtable, ...) as canonical JSON


def nft_wanted_state(rulesets: Sequence[RuleSet]) -> dict[str, NftTableState]:
    """What `nft -j list ruleset` must show for our tables after `nft_json(rulesets)` is applied."""
    rules = nft_rules(rulesets)
    state: dict[str, NftTableState] = {}
    for table in NFT_TABLES:
        mine = [r for r in rules if r.table == table]
        if not mine:
            continue
        chains = [_chain_key(b.json(table)) for b in NFT_BASE_CHAINS[table]]
        chains += [_chain_key({"name": name}) for name in NFT_REGULAR_CHAINS]
        state[table] = NftTableState(
            chains=tuple(sorted(chains)),
            rules=_group_rules((r.chain, canonical_expr(r.expr())) for r in mine),
        )
    return state


def _group_rules(rules: Iterable[tuple[str, str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rule order matters within a chain only; the listing groups rules by chain."""
    by_chain: dict[str, list[str]] = {}
    for chain, expr in rules:
        by_chain.setdefault(chain, []).append(expr)
    return tuple((chain, tuple(by_chain[chain])) for chain in sorted(by_chain))


def _chain_key(chain: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, object], ...]]:
    hook = tuple((k, chain[k]) for k in ("type", "hook", "prio", "policy") if k in chain)
    return str(chain["name"]), hook


def canonical_expr(expr: object) -> str:
    """Rule expression as stable JSON: counters zeroed, `x & m | v` folded to nft's `x & (m|v) | v`."""
    return json.dumps(_canon(expr), sort_keys=True, separators=(",", ":"))


def _canon(node: object) -> object:
    if isinstance(node, list):
        return [_canon(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "counter" in node and len(node) == 1:
        return {"counter": None}
    if set(node) == {"|"}:
        operands = node["|"]
        if (isinstance(operands, list) and len(operands) == 2 and isinstance(operands[0], dict)
                and set(operands[0]) == {"&"} and isinstance(operands[1], int)):
            inner, mask = operands[0]["&"]
            if isinstance(mask, int):
                return {"|": [{"&": [_canon(inner), mask | operands[1]]}, operands[1]]}
    return {k: _canon(v) for k, v in node.items()}


def nft_live_state(listing: Mapping[str, Any]) -> dict[str, NftTableState]:
    """Our tables as found in `nft -j list ruleset` output (handles, counters, metainfo dropped)."""
    chains: dict[str, list[tuple[str, tuple[tuple[str, object], ...]]]] = {}
    rules: dict[str, list[tuple[str, str]]] = {}
    other: dict[str, list[str]] = {}
    for obj in listing.get("nftables", []):
        if not isinstance(obj, dict) or len(obj) != 1:
            continue
        kind, body = next(iter(obj.items()))
        if kind == "metainfo" or not isinstance(body, dict) or body.get("family") != NFT_FAMILY:
            continue
        table = body.get("table") if kind != "table" else body.get("name")
        if table not in NFT_TABLES:
            continue
        chains.setdefault(table, [])
        rules.setdefault(table, [])
        other.setdefault(table, [])
        if kind == "table":
            continue
        if kind == "chain":
            chains[table].append(_chain_key(body))
        elif kind == "rule":
            rules[table].append((str(body["chain"]), canonical_expr(body.get("expr", []))))
        else:
            trimmed = {k: v for k, v in body.items() if k != "handle"}
            other[table].append(kind + ":" + canonical_expr(trimmed))
    return {
        t: NftTableState(chains=tuple(sorted(chains[t])), rules=_group_rules(rules[t]), other=tuple(other[t]))
        for t in chains
    }
