"""In-pod redirect rules as data (pure).

The rule text, chain names and their order are a compatibility surface: operators, tools and ztunnel
assume them (spec: redirect-rules.md §2-§4). Keeping them as plain data, apart from any backend, lets
golden tests pin the exact bytes while the kernel backends (python-iptables today, nftables later)
translate the same tuples. Nothing here touches the system.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
    """The link-local (v4) / ULA (v6) source the host SNATs kubelet probes to."""
    return PROBE_SNAT_IPV4 if _check_family(family) == 4 else PROBE_SNAT_IPV6


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
    """Linux interface name rules; rejecting others keeps odd annotation text out of rule tokens."""
    return (
        0 < len(name) < _IFNAMSIZ
        and name not in (".", "..")
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
        declared: list[str] = []
        rules = self.rules_in(table)
        for r in rules:
            if r.chain not in BUILTIN_CHAINS and r.chain not in declared:
                declared.append(r.chain)
        for r in rules:
            target = r.jump_target
            if target is not None and target not in BUILTIN_CHAINS and target not in declared:
                declared.append(target)
        return tuple(declared)

    def chain_rules(self, table: str, chain: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.table == table and r.chain == chain)


def build_ruleset(settings: RuleSettings, family: int = 4) -> RuleSet:
    """Generate the rules of spec §4 in its row order; conditions decide which rows appear."""
    _check_family(family)
    lo = loopback_cidr(family)
    snat = probe_snat_address(family)
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
