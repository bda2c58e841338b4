"""nftables backend: our `inet istio-ambient-*` tables, one atomic transaction per pod (spec §5, §7, §8).

Runs INSIDE the pod netns on the NetnsWorker, like the iptables backend, with the same interface
(`apply`, `matches`, `remove`). The transaction text/JSON is built purely in `rules.py`.

Why the libnftables Python binding with JSON input, not `nft -j -f -` in a subprocess
(measured on this 2-core Debian 12 VM, nftables 1.0.6, fresh pod netns, Block F rule set, medians;
`python -m bench rules` measures both in the same run):
  - binding, one JSON transaction incl. context creation and the table-name read: ~0.8-1.7 ms
  - `nft -j -f -` forked from the worker thread (same transaction):               ~8-11 ms
  The kernel commit is the same either way; the subprocess only adds process start-up, which is most
  of the per-pod budget (<= 1.5 ms). JSON rather than text because the input is data, not a language:
  an interface name from an annotation can never change the command's meaning, and nft's JSON
  listing is what `matches` compares against.

libnftables quirk: a context opens its netlink socket in `nft_ctx_new`, so it is bound to the netns of
the thread that created it (a context made in the host netns and used after setns writes to the HOST).
Every call therefore creates a fresh context inside the worker's current netns and drops it before
returning; contexts are never cached or shared between namespaces.

Apply strategy: read the table names first (~0.1 ms on a fresh pod, where nothing of ours exists);
nothing of ours → the spec transaction (`add table` + `flush table`, chains, rules) as is. Ours present
→ read them: identical → no-op (counters kept); only rules differ → the same spec transaction, which
replaces every rule atomically; a shape `flush table` cannot repair (a stray chain or set, a base
chain with another hook/priority) → one transaction that deletes and recreates our tables.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Sequence
from typing import Any, Literal

import nftables  # Debian's python3-nftables (libnftables.so.1 via ctypes)

from cni_agent.redirect.rules import (
    NFT_BASE_CHAINS,
    NFT_FAMILY,
    NFT_REGULAR_CHAINS,
    NFT_TABLES,
    NftTableState,
    RuleSet,
    nft_delete_json,
    nft_json,
    nft_live_state,
    nft_replace_json,
    nft_wanted_state,
)

NAME = "nftables"

Mode = Literal["binding", "subprocess"]


class NftRulesError(Exception):
    """An nft transaction or listing failed; carries nft's own error text."""


class _Nft:
    """One libnftables context (binding) or `nft -j` invocations (subprocess), JSON in and out."""

    def __init__(self, mode: Mode) -> None:
        self._mode = mode
        self._ctx: Any = None
        if mode == "binding":
            try:
                self._ctx = nftables.Nftables()  # binds to the calling thread's netns NOW
            except OSError as exc:
                raise NftRulesError(f"libnftables is not available: {exc}") from exc
            self._ctx.set_json_output(True)

    def run(self, doc: dict[str, Any] | str, what: str) -> str:
        text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
        if self._mode == "binding":
            rc, out, err = self._ctx.cmd(text)
        else:
            proc = subprocess.run(["nft", "-j", "-f", "-"], input=text, capture_output=True, text=True,
                                  check=False)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        if rc != 0:
            raise NftRulesError(f"nft {what} failed (rc={rc}): {str(err).strip() or 'no error text'}")
        return str(out)

    def list(self, what: str) -> dict[str, Any]:
        """`nft -j list <what>` (e.g. "tables", "ruleset") as parsed JSON."""
        if self._mode == "binding":
            rc, out, err = self._ctx.cmd(f"list {what}")
        else:
            proc = subprocess.run(["nft", "-j", "list", *what.split()], capture_output=True, text=True,
                                  check=False)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        if rc != 0:
            raise NftRulesError(f"nft list {what} failed (rc={rc}): {str(err).strip()}")
        if not out.strip():
            return {"nftables": []}
        parsed = json.loads(out)
        if not isinstance(parsed, dict):
            raise NftRulesError(f"nft list {what}: unexpected JSON {type(parsed).__name__}")
        return parsed


def _our_table_names(listing: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for obj in listing.get("nftables", []):
        table = obj.get("table") if isinstance(obj, dict) else None
        if isinstance(table, dict) and table.get("family") == NFT_FAMILY and table.get("name") in NFT_TABLES:
            names.add(str(table["name"]))
    return names


def _flush_repairs(table: str, have: NftTableState) -> bool:
    """True when `flush table` + re-adding our chains turns `have` into our table (no delete needed)."""
    if have.other:
        return False
    allowed: set[tuple[str, tuple[tuple[str, object], ...]]] = {
        (b.name, (("type", b.type), ("hook", b.hook), ("prio", b.prio), ("policy", "accept")))
        for b in NFT_BASE_CHAINS[table]
    }
    allowed |= {(name, ()) for name in NFT_REGULAR_CHAINS}
    # base chains must carry exactly this table's hook spec; `add chain` would fail otherwise
    return all(c in allowed for c in have.chains)


@functools.lru_cache(maxsize=128)
def _apply_text(rulesets: tuple[RuleSet, ...]) -> str:
    """The serialized apply transaction; cached because building it in Python costs ~0.15 ms per pod
    while pods share a handful of variants (rule sets are frozen, hashable values)."""
    return json.dumps(nft_json(rulesets), separators=(",", ":"))


class NftablesBackend:
    """Install, check and remove our nft tables in the current (pod) netns; `mode` is for the benchmark."""

    name = NAME

    def __init__(self, mode: Mode = "binding") -> None:
        self._mode: Mode = mode

    def apply(self, rulesets: Sequence[RuleSet]) -> None:
        """Make our tables exactly the rule sets' content, in one transaction; no-op when already so."""
        nft = _Nft(self._mode)
        present = _our_table_names(nft.list("tables"))
        doc: dict[str, Any] | str = _apply_text(tuple(rulesets))
        replacing = False
        if present:
            wanted = nft_wanted_state(rulesets)
            live = nft_live_state(nft.list("ruleset"))
            if live == wanted:
                return
            if not all(_flush_repairs(name, state) for name, state in live.items() if name in wanted):
                doc, replacing = nft_replace_json(rulesets), True
        try:
            nft.run(doc, "apply")
        except NftRulesError as first:
            if replacing:
                raise
            # e.g. a base chain changed by hand between our read and our write: replace outright
            try:
                nft.run(nft_replace_json(rulesets), "apply (delete and recreate)")
            except NftRulesError as second:
                raise NftRulesError(f"{first}; retry with delete+recreate: {second}") from second

    def matches(self, rulesets: Sequence[RuleSet]) -> bool:
        """True when our tables hold exactly the wanted chains and rules (semantically, via JSON)."""
        nft = _Nft(self._mode)
        if not _our_table_names(nft.list("tables")):
            return False
        return nft_live_state(nft.list("ruleset")) == nft_wanted_state(rulesets)

    def present(self) -> bool:
        """Whether any of our tables exists here (cheap: table names only)."""
        return bool(_our_table_names(_Nft(self._mode).list("tables")))

    def remove(self, families: Sequence[int] = (4, 6)) -> None:
        """Spec §8: delete our three tables in one transaction; absent tables are fine.

        `families` is accepted for interface parity with the iptables backend: `inet` tables hold both.
        """
        del families
        _Nft(self._mode).run(nft_delete_json(), "remove")


def nft_json_supported() -> tuple[bool, str]:
    """Whether libnftables accepts JSON here (some builds answer `JSON support not compiled-in`).

    Read-only: an empty JSON batch and a table-name listing in the calling thread's netns.
    """
    try:
        nft = _Nft("binding")
        nft.run({"nftables": []}, "JSON probe")
        nft.list("tables")
    except NftRulesError as exc:
        return False, str(exc)
    return True, "libnftables with JSON support"
