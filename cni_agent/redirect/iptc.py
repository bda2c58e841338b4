"""iptables-legacy backend on python-iptables (libiptc), run INSIDE the pod netns by the NetnsWorker.

Why libiptc rather than spawning `iptables-restore`: no fork/exec per pod, and one atomic commit per
table in which we can compare what is there with what we want and rewrite only our own chains.

python-iptables has process-wide quirks this module contains:
- `Table` objects are singletons per table name, and their libiptc handle (with a raw socket) is
  bound to the netns of the thread that last refreshed it. We refresh every table of the family at
  the start of each operation and close them all at the end, so no handle outlives the operation
  (an open handle would also pin the pod netns after the pod is gone).
- Creating any non-builtin target (CONNMARK, CT, a chain jump) scans *every* cached table handle for a
  chain of that name; a closed handle there segfaults the process. Hence "refresh all, then build".
- libxtables registers an extension's per-family variants only for the family active when its .so
  is first dlopen'ed, and dlopen runs constructors once. libxt_NAT.so (REDIRECT, SNAT, DNAT) is
  per-family, so after IPv4 use IPv6 REDIRECT is "not found" (and python-iptables' fallback of
  calling the init function again makes libxtables exit(1) on "already registered"). We load a
  private copy (memfd) of libxt_NAT.so under the other family once; see `_ensure_nat_targets`.
- Building a rule redirects the process's fd 1 for a moment to read extension output. Nothing else
  in the process should write to stdout while rules are built (log to stderr).
All calls must come from one thread (the NetnsWorker), also for host-side use (`call_host`).

Per-pod cost (fresh pod netns, Block A, 2-core VM): ~0.4-0.5 ms, down from ~10 ms, because rules are
built once per (family, spec) and appended as entry bytes (`wanted_rule`); a chain created in this
commit is not read back. Measured and kept: refreshing all five tables (filter and security too)
costs ~0.05 ms together; it stays, since comparing a rule's target scans every table handle.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import iptc  # python-iptables
import structlog

from cni_agent.redirect.rules import BUILTIN_CHAINS, OUR_CHAINS, OUR_TABLES, RuleSet

NAME = "iptables-legacy"

_ADDRESS_OPTIONS = {"-s": "src", "-d": "dst", "-p": "protocol", "-i": "in_interface", "-o": "out_interface"}
_OPTION_ALIASES = {("REDIRECT", "to-port"): "to-ports"}
"""iptables accepts unambiguous option prefixes (getopt); python-iptables' parsing does not."""
_RULE_CACHE_SIZE = 512

log = structlog.get_logger(__name__)


class RulesError(Exception):
    """A rule could not be translated, read or committed; says which table/chain/rule."""


def _family_api(family: int) -> tuple[Any, Any, Any]:
    """(Table class, Rule class, availability probe) for an address family."""
    if family == 4:
        return iptc.Table, iptc.Rule, iptc.is_table_available
    if family == 6:
        table6 = getattr(iptc, "Table6", None)
        if table6 is None:
            raise RulesError("python-iptables has no IPv6 support (libip6tc missing)")
        return table6, iptc.Rule6, iptc.is_table6_available
    raise RulesError(f"unknown address family {family!r}")


_NAT_LOADED: set[int] = set()


def _ensure_nat_targets(family: int) -> None:
    """Make REDIRECT/SNAT/DNAT resolvable for `family` even if libxt_NAT.so was loaded for the other."""
    if family in _NAT_LOADED:
        return
    xt_mod = iptc.xtables
    proto = xt_mod.NFPROTO_IPV4 if family == 4 else xt_mod.NFPROTO_IPV6
    xt = xt_mod.xtables(proto)
    if not xt.find_target("REDIRECT"):
        xt_mod.xtables._xtables_set_nfproto(proto)  # the copy's constructor registers for this family
        source = os.path.join(xt_mod._xtables_libdir, "libxt_NAT.so")
        with open(source, "rb") as src:
            image = src.read()
        try:
            fd = os.memfd_create("libxt_NAT", os.MFD_CLOEXEC)
            path = f"/proc/self/fd/{fd}"
        except OSError:  # pragma: no cover - very old kernels
            fd, path = tempfile.mkstemp(prefix="libxt_NAT-", suffix=".so")
        try:
            os.write(fd, image)
            ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
        finally:
            os.close(fd)
            if not path.startswith("/proc/"):
                os.unlink(path)
    _NAT_LOADED.add(family)


@contextmanager
def iptc_session(family: int, names: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Fresh handles for the tables `names` of `family` in the calling thread's netns; closed after.

    Only the named tables are opened: opening a legacy table instantiates it in the netns, and a pod
    given `filter` and `security` tables it never asked for would run every packet through their
    hooks. python-iptables scans every table it believes available whenever it builds or decodes a
    target (and segfaults on a stale handle), with a process-wide availability cache; each session
    therefore sets that cache to exactly the tables it opened. A table the kernel cannot provide is
    left out of the result (callers decide whether that is an error).

    Usable for host-side work too (from the worker via `call_host`), so the process shares one
    discipline for the libiptc caches. Sessions never nest (one worker thread).
    """
    table_cls, _rule_cls, _available = _family_api(family)
    known: dict[str, bool] = table_cls.existing_table_names
    asked = set(names)
    wanted = [name for name in table_cls.ALL if name in asked]
    tables: dict[str, Any] = {}
    try:
        _ensure_nat_targets(family)
        for name in table_cls.ALL:
            known[name] = False
        for name in wanted:
            try:
                table = table_cls(name, autocommit=False)
                table.autocommit = False
                table.refresh()
            except iptc.IPTCError:
                continue  # the kernel has no such table here
            tables[name] = table
            known[name] = True
        yield tables
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        raise RulesError(f"iptables (IPv{family}): {exc}") from exc
    finally:
        for table in tables.values():
            table.close()


def existing_tables(family: int) -> frozenset[str]:
    """The legacy x_tables tables of `family` that exist in the calling thread's netns (thread-self:
    setns is per thread). Cheap (~0.03 ms), and unlike opening a table it never creates one."""
    name = "ip_tables_names" if family == 4 else "ip6_tables_names"
    try:
        fd = os.open(f"/proc/thread-self/net/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return frozenset()
    try:
        return frozenset(os.read(fd, 4096).decode().split())
    finally:
        os.close(fd)


def build_iptc_rule(family: int, spec: Sequence[str]) -> Any:
    """Translate iptables tokens (after `-A <chain>`) into a python-iptables Rule.

    Covers what our rules use: `!`, -s/-d/-p/-i/-o, `-m <match> --opt [value]`, implicit protocol
    matches (`-p tcp --dport 53`), `-j/-g <target> --opt [value]`. Jump targets must already exist
    as chains in the session's table handles.
    """
    _table_cls, rule_cls, _available = _family_api(family)
    rule = rule_cls()
    protocol: str | None = None
    current: Any = None
    current_name = ""
    negate = False
    tokens = list(spec)
    i = 0
    try:
        while i < len(tokens):
            token = tokens[i]
            if token == "!":
                negate = True
                i += 1
                continue
            if token in _ADDRESS_OPTIONS:
                value = _arg(tokens, i)
                setattr(rule, _ADDRESS_OPTIONS[token], ("!" if negate else "") + value)
                if token == "-p":
                    protocol = value
                negate = False
                i += 2
                continue
            if token == "-m":
                _no_negation(negate, token, spec)
                current_name = _arg(tokens, i)
                current = rule.create_match(current_name)
                i += 2
                continue
            if token in ("-j", "-g"):
                _no_negation(negate, token, spec)
                current_name = _arg(tokens, i)
                current = rule.create_target(current_name, goto=(token == "-g"))
                i += 2
                continue
            if token.startswith("--"):
                name = token[2:]
                values: list[str] = []
                i += 1
                while i < len(tokens) and tokens[i] != "!" and not tokens[i].startswith("-"):
                    values.append(tokens[i])
                    i += 1
                if current is None:
                    if protocol is None:
                        raise RulesError(f"option {token} has no match in rule {' '.join(spec)!r}")
                    current_name = protocol
                    current = rule.create_match(protocol)  # iptables' implicit `-m <proto>`
                name = _OPTION_ALIASES.get((current_name, name), name)
                if len(values) <= 1:
                    current.set_parameter(name, ("!" if negate else "") + (values[0] if values else ""))
                else:
                    current.set_parameter(name, (["!"] if negate else []) + values)
                negate = False
                continue
            raise RulesError(f"unsupported token {token!r} in rule {' '.join(spec)!r}")
        rule.final_check()
    except (iptc.IPTCError, iptc.XTablesError, ValueError, AttributeError) as exc:
        raise RulesError(f"cannot build rule {' '.join(spec)!r}: {exc}") from exc
    return rule


@dataclass(frozen=True)
class WantedRule:
    """A rule built once: the python-iptables object (for comparisons) and its libiptc entry bytes."""

    rule: Any
    entry: Any  # ctypes buffer: ipt_entry/ip6t_entry + matches + target, what iptc_append_entry takes


@functools.lru_cache(maxsize=_RULE_CACHE_SIZE)
def wanted_rule(family: int, spec: tuple[str, ...]) -> WantedRule:
    """`build_iptc_rule` + final check + entry bytes, cached per (family, spec).

    Why: building a rule is ~0.3 ms each (python-iptables parses every extension option and reads the
    extension's save output back through a stdout pipe, in `final_check`), and `Chain.append_rule`
    repeats that final check on every append: ~6 ms of the ~6.5 ms a pod's 18 rules cost. Pods share
    a few rule variants, and the entry bytes do not depend on any table handle (libiptc copies the
    entry and resolves a chain-jump's name in the handle it is appended to), so one build serves every
    pod. Must be first called inside an `iptc_session` whose tables hold the jump targets' chains
    (python-iptables decides "chain jump or extension" by looking the name up in the open tables);
    failures raise and are not cached. Cached objects are only read after that, never mutated.
    """
    rule = build_iptc_rule(family, spec)
    try:
        entry = rule.rule  # final_check already ran in build_iptc_rule
    except (iptc.IPTCError, iptc.XTablesError, ValueError) as exc:
        raise RulesError(f"cannot encode rule {' '.join(spec)!r}: {exc}") from exc
    if not entry:
        raise RulesError(f"rule {' '.join(spec)!r} has no target")
    return WantedRule(rule, entry)


def _arg(tokens: list[str], i: int) -> str:
    if i + 1 >= len(tokens):
        raise RulesError(f"{tokens[i]} needs an argument in {' '.join(tokens)!r}")
    return tokens[i + 1]


def _no_negation(negate: bool, token: str, spec: Sequence[str]) -> None:
    if negate:
        raise RulesError(f"'!' before {token} is not supported in {' '.join(spec)!r}")


def same_rule(a: Any, b: Any) -> bool:
    """Rule equality that keeps match order and target identity (python-iptables' own ignores order)."""
    if (a.src, a.dst, a.protocol, a.in_interface, a.out_interface) != (
        b.src, b.dst, b.protocol, b.in_interface, b.out_interface
    ):
        return False
    if a.nfproto == socket.AF_INET and a.fragment != b.fragment:  # IPv6 entries have no fragment flag
        return False
    am, bm = a.matches, b.matches
    if len(am) != len(bm) or any(x.name != y.name or x != y for x, y in zip(am, bm, strict=True)):
        return False
    ta, tb = a.target, b.target
    if ta is None or tb is None:
        return ta is None and tb is None
    return bool(ta.name == tb.name and ta.goto == tb.goto and ta == tb)


def _same_list(want: Sequence[Any], have: Sequence[Any]) -> bool:
    return len(want) == len(have) and all(same_rule(w, h) for w, h in zip(want, have, strict=True))


def _refs_ours(rule: Any) -> bool:
    target = rule.target
    return target is not None and target.name in OUR_CHAINS


def _builtin_chains(table: Any) -> list[Any]:
    return [c for c in table.chains if c.name in BUILTIN_CHAINS and table.builtin_chain(c.name)]


def _holds_ours(table: Any) -> bool:
    """Whether anything of ours acts in `table`: a builtin jump to our chains or a non-empty one."""
    if any(_refs_ours(r) for chain in _builtin_chains(table) for r in chain.rules):
        return True
    return any(table.is_chain(c) and iptc.Chain(table, c).rules for c in OUR_CHAINS)


def our_tables_here(family: int) -> frozenset[str]:
    """Which of our tables (mangle, nat, raw) exist here: the ones to open for reading or cleaning."""
    return existing_tables(family) & frozenset(OUR_TABLES)


def legacy_tables_present(family: int) -> bool:
    """Any legacy x_tables table of `family` in the calling thread's netns (never creates one)."""
    return bool(existing_tables(family))


class IptablesLegacyBackend:
    """Install, check and remove our chains with libiptc; one commit per table, foreign rules kept."""

    name = NAME

    def apply(self, rulesets: Sequence[RuleSet]) -> None:
        """Make our chains and jumps exactly the rule sets' content; a no-op when already so.

        Per family, every table is planned (edited in its libiptc handle) before the first commit:
        a table that cannot be planned then fails the apply with nothing of that family committed,
        instead of leaving mangle/nat in the new form and raw in the old.
        """
        for rs in rulesets:
            # the tables our rules need, plus ours already here (leftovers to clean, e.g. raw)
            names = set(rs.tables()) | our_tables_here(rs.family)
            with iptc_session(rs.family, names) as tables:
                planned: list[tuple[str, Any]] = []
                for tname in OUR_TABLES:
                    table = tables.get(tname)
                    if table is None:
                        if rs.rules_in(tname):
                            raise RulesError(f"IPv{rs.family} table {tname} is not available in this netns")
                        continue
                    try:
                        if self._sync_table(table, rs, tname):
                            planned.append((tname, table))
                    except (iptc.IPTCError, iptc.XTablesError) as exc:
                        raise RulesError(f"IPv{rs.family} {tname}: {exc}") from exc
                for tname, table in planned:
                    try:
                        table.commit()
                    except (iptc.IPTCError, iptc.XTablesError) as exc:
                        raise RulesError(f"IPv{rs.family} {tname}: {exc}") from exc

    def matches(self, rulesets: Sequence[RuleSet]) -> bool:
        """True when exactly our rules (no more, no fewer, no duplicates) are present.

        A family without a rule set (IPv6 while IPv6 is off) must hold nothing of ours.
        """
        for rs in rulesets:
            here = our_tables_here(rs.family)
            if not set(rs.tables()) <= here:
                return False  # looking would create the missing table
            with iptc_session(rs.family, here) as tables:
                for tname in OUR_TABLES:
                    table = tables.get(tname)
                    if table is None:
                        if rs.rules_in(tname):
                            return False
                        continue
                    if not self._table_matches(table, rs, tname):
                        return False
        for family in (4, 6):
            here = our_tables_here(family)
            if family in families_of(rulesets) or not here:
                continue
            with iptc_session(family, here) as tables:
                if any(_holds_ours(table) for table in tables.values()):
                    return False
        return True

    def remove(self, families: Sequence[int]) -> None:
        """Spec §8: drop jumps to our chains, flush and delete them; missing pieces are fine.

        A family with no legacy table in this netns is skipped: nothing of ours can be there, and
        opening its tables would create them.
        """
        for family in families:
            here = our_tables_here(family)
            if not here:
                continue
            with iptc_session(family, here) as tables:
                for tname in OUR_TABLES:
                    table = tables.get(tname)
                    if table is None:
                        continue
                    changed = False
                    for chain in _builtin_chains(table):
                        for rule in reversed(chain.rules):
                            if _refs_ours(rule):
                                chain.delete_rule(rule)
                                changed = True
                    present = [c for c in OUR_CHAINS if table.is_chain(c)]
                    for name in present:
                        table.flush_entries(name)
                        changed = True
                    for name in present:
                        # Still referenced by a foreign chain: spec §8 says errors are ignored.
                        with suppress(iptc.IPTCError):
                            table.delete_chain(name)
                    if changed:
                        table.commit()

    # --- internals -----------------------------------------------------------------------------

    def _sync_table(self, table: Any, rs: RuleSet, tname: str) -> bool:
        changed = False
        desired = rs.chains_declared(tname)
        ours_before = [c for c in OUR_CHAINS if table.is_chain(c)]
        created: set[str] = set()
        for chain_name in desired:
            if chain_name not in ours_before:
                table.create_chain(chain_name)
                created.add(chain_name)
                changed = True
        # Our chains: rewrite the whole content when it differs in any way (drift repair).
        for chain_name in desired:
            want = [wanted_rule(rs.family, r.spec) for r in rs.chain_rules(tname, chain_name)]
            # a chain created just now is empty: skip reading (and parsing) it back
            have = [] if chain_name in created else iptc.Chain(table, chain_name).rules
            if not _same_list([w.rule for w in want], have):
                if have:
                    table.flush_entries(chain_name)
                for w in want:
                    table.append_entry(chain_name, w.entry)
                changed = True
        if not ours_before:
            # None of our chains existed, so no rule here can jump to one: append our jumps without
            # reading the builtin chains (the common case, a fresh pod; ~0.1 ms per table saved).
            for chain_name in rs.builtin_chains_used(tname):
                for r in rs.chain_rules(tname, chain_name):
                    table.append_entry(chain_name, wanted_rule(rs.family, r.spec).entry)
                    changed = True
            return changed
        # Builtin chains: keep one copy of each wanted jump, drop any other reference to our chains.
        for chain in _builtin_chains(table):
            remaining = [wanted_rule(rs.family, r.spec) for r in rs.chain_rules(tname, chain.name)]
            stale = []
            for rule in chain.rules:
                if not _refs_ours(rule):
                    continue
                idx = next((k for k, w in enumerate(remaining) if same_rule(rule, w.rule)), None)
                if idx is None:
                    stale.append(rule)
                else:
                    remaining.pop(idx)
            for rule in stale:
                chain.delete_rule(rule)
                changed = True
            for w in remaining:
                table.append_entry(chain.name, w.entry)
                changed = True
        # Our chains this variant does not use (e.g. raw with DNS capture now off). A foreign chain
        # may still jump to one; its rules are not ours to touch (spec §7), so the chain stays, empty
        # (a jump to an empty chain just returns), and the apply completes instead of failing forever.
        for chain_name in ours_before:
            if chain_name not in desired:
                if iptc.Chain(table, chain_name).rules:
                    table.flush_entries(chain_name)
                    changed = True
                try:
                    table.delete_chain(chain_name)
                    changed = True
                except iptc.IPTCError as exc:
                    log.warning("unused chain still referenced by a foreign rule; left empty",
                                family=rs.family, table=tname, chain=chain_name, error=str(exc))
        return changed

    def _table_matches(self, table: Any, rs: RuleSet, tname: str) -> bool:
        desired = rs.chains_declared(tname)
        for chain_name in OUR_CHAINS:
            if chain_name in desired or not table.is_chain(chain_name):
                continue
            if iptc.Chain(table, chain_name).rules:  # empty = one `_sync_table` could not delete
                return False
        for chain_name in desired:
            if not table.is_chain(chain_name):
                return False
            want = [wanted_rule(rs.family, r.spec).rule for r in rs.chain_rules(tname, chain_name)]
            if not _same_list(want, iptc.Chain(table, chain_name).rules):
                return False
        for chain in _builtin_chains(table):
            want = [wanted_rule(rs.family, r.spec).rule for r in rs.chain_rules(tname, chain.name)]
            have = [r for r in chain.rules if _refs_ours(r)]
            if not _same_list(want, have):
                return False
        return True


def families_of(rulesets: Sequence[RuleSet]) -> tuple[int, ...]:
    """Address families covered, in order, for removal calls."""
    return tuple(dict.fromkeys(rs.family for rs in rulesets))

