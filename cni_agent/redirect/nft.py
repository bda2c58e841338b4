"""nftables backend: our `inet istio-ambient-*` tables, one atomic transaction per pod (spec §5, §7, §8).

Runs INSIDE the pod netns on the NetnsWorker, like the iptables backend, with the same interface
(`apply`, `matches`, `remove`). The transaction text/JSON is built purely in `rules.py`, the
fresh-pod netlink batch purely in `nftbatch.py`.

Two ways to the same kernel state (measured on this 2-core Debian 12 VM, nftables 1.0.6, fresh pod
netns, Block F rule set, medians; `python -m bench rules` measures all of them in the same run):
  - fresh pod: the precompiled batch (`nftbatch`), one send on a raw netlink socket:    ~0.25 ms
  - libnftables in-process, the same transaction as JSON:                             ~1.0-1.4 ms
  - `nft -j -f -` forked from the worker thread:                                        ~6-8 ms
The kernel's own work is ~0.2 ms of each. libnftables spends the rest parsing the JSON, fetching
its cache (five netlink round trips), evaluating and linearizing rules that only differ between a
handful of variants; the batch does that once per variant, and a test proves the kernel state it
leaves byte-identical to libnftables' (tests/integration/test_nft_batch.py).

libnftables' JSON API stays the authority for everything else: a netns that already holds our tables
(reconcile), a variant the compiler does not support, a batch the kernel refused (libnftables retries
and reports its own error), and listings for `matches`. Removal is a precompiled delete batch too
(`nftbatch.delete_batch`), for a different reason: its socket must be closed off the worker thread
(a deleting transaction makes `close` wait ~12 ms), and libnftables contexts must not be freed on
another thread. JSON rather than `nft -f` text
because the input is data, not a language: an interface name from an annotation can never change a
command's meaning, and nft's JSON listing is what `matches` compares against (text would be ~0.2 ms
faster inside libnftables). Not `nft -j -f -`: process start-up alone is most of the per-pod budget.

libnftables quirk: a context opens its netlink socket in `nft_ctx_new`, so it is bound to the netns of
the thread that created it (a context made in the host netns and used after setns writes to the HOST).
Every pod call therefore creates a fresh context inside the worker's current netns and frees it on
that thread before returning; pod contexts are never cached or shared between namespaces (the host
probe keeps one for the host netns, see hostprobe.py).

Apply strategy: read the table names first (one raw netlink dump, ~0.03 ms; see `_Nfnl`). Nothing
of ours (a fresh pod) → the precompiled batch, whose NLM_F_EXCL tables abort it if one appeared
meanwhile. Ours present → read them through libnftables: identical → no-op (counters kept);
different → one precompiled batch that deletes our tables and creates them anew (`replace_batch`).
For variants the compiler refuses, libnftables' JSON: only rules differ → the spec transaction
(`flush table` + re-add, atomic); a shape `flush table` cannot repair (a stray chain or set, a base
chain with another hook/priority) → one transaction that deletes and recreates our tables.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import json
import os
import struct
import subprocess
from collections.abc import Sequence
from typing import Any, Literal

import structlog

from cni_agent.redirect import nlattr, nldump
from cni_agent.redirect.netns import join_main_thread_netns
from cni_agent.redirect.nftbatch import Batch, delete_batch, fresh_batch, replace_batch
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

log = structlog.get_logger(__name__)

NAME = "nftables"
_LIBNFTABLES = "libnftables.so.1"

Mode = Literal["binding", "subprocess"]


class NftRulesError(Exception):
    """An nft transaction or listing failed; carries nft's own error text."""


class BatchRejected(NftRulesError):
    """The kernel refused a precompiled batch; `errno` says why (EEXIST: our table appeared)."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def _prototype(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    """`lib.name` with its C prototype declared: ctypes would otherwise pass and return C ints,
    truncating the context pointer on 64-bit."""
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class _Libnftables:
    """libnftables' C API through ctypes, prototypes declared once per process.

    Why not `nftables.Nftables()` (Debian's binding, the same library through ctypes): its constructor
    re-runs `LoadLibrary` and re-declares ~20 function prototypes for every context, ~0.15 ms, and we
    need a fresh context per pod (see the module docstring). Here a context costs only
    `nft_ctx_new` (~0.06 ms in a fresh pod netns). Same calls, same JSON in and out as the binding.
    """

    _OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self) -> None:
        lib = ctypes.CDLL(_LIBNFTABLES)
        vp = ctypes.c_void_p
        self.ctx_new = _prototype(lib, "nft_ctx_new", vp, ctypes.c_uint32)
        self.ctx_free = _prototype(lib, "nft_ctx_free", None, vp)
        self.get_flags = _prototype(lib, "nft_ctx_output_get_flags", ctypes.c_uint, vp)
        self.set_flags = _prototype(lib, "nft_ctx_output_set_flags", None, vp, ctypes.c_uint)
        self.buffer_output = _prototype(lib, "nft_ctx_buffer_output", ctypes.c_int, vp)
        self.buffer_error = _prototype(lib, "nft_ctx_buffer_error", ctypes.c_int, vp)
        self.output = _prototype(lib, "nft_ctx_get_output_buffer", ctypes.c_char_p, vp)
        self.error = _prototype(lib, "nft_ctx_get_error_buffer", ctypes.c_char_p, vp)
        self.run = _prototype(lib, "nft_run_cmd_from_buffer", ctypes.c_int, vp, ctypes.c_char_p)

    def new_ctx(self) -> int:
        """A context with buffered output/error and JSON output; bound to the calling thread's netns."""
        ctx = self.ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftRulesError("nft_ctx_new failed")
        self.buffer_output(ctx)
        self.buffer_error(ctx)
        self.set_flags(ctx, self.get_flags(ctx) | self._OUTPUT_JSON)
        return int(ctx)


@functools.cache
def _closer() -> concurrent.futures.ThreadPoolExecutor:
    """One background thread that closes raw netlink sockets after deleting transactions (see
    `_Nfnl.close_later`). It joins the main thread's netns first: a thread starts in its creator's
    netns, and this one is first started from a pod job. Only plain sockets are closed there,
    never libnftables contexts: `nft_ctx_free` empties a process-wide interface cache without a
    lock, which races with a listing on the worker (a segfault, reproduced)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-close",
                                                 initializer=join_main_thread_netns)


@functools.cache
def _libnftables() -> _Libnftables:
    try:
        return _Libnftables()
    except (OSError, AttributeError) as exc:
        raise NftRulesError(f"libnftables is not available: {exc}") from exc


class _Nft:
    """One libnftables context (binding) or `nft -j` invocations (subprocess), JSON in and out.

    Use as a context manager: the context (and its netlink socket) is freed on exit.
    """

    def __init__(self, mode: Mode) -> None:
        self._mode = mode
        self._ctx: int | None = None
        if mode == "binding":
            self._lib = _libnftables()
            self._ctx = self._lib.new_ctx()  # binds to the calling thread's netns NOW

    def close(self) -> None:
        """Free the context here, on the thread that used it (see `_closer` for why not elsewhere).
        Paths that delete through libnftables (drift repair) then wait ~12 ms in `close`; the hot
        paths (fresh pod, remove) do not use libnftables."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            self._lib.ctx_free(ctx)

    def __enter__(self) -> _Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _cmd(self, text: str) -> tuple[int, str, str]:
        assert self._ctx is not None
        rc = self._lib.run(self._ctx, text.encode())
        out = self._lib.output(self._ctx) or b""
        err = self._lib.error(self._ctx) or b""
        return int(rc), out.decode(), err.decode()

    def run(self, doc: dict[str, Any] | str, what: str) -> str:
        text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
        if self._mode == "binding":
            rc, out, err = self._cmd(text)
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
            rc, out, err = self._cmd(f"list {what}")
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


# --- "any of our tables here?" and the precompiled batches, without libnftables ---------------------

_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NFTA_TABLE_NAME = 1
_NFPROTO_INET = 1
_NFGENMSG_INET = struct.pack("=BBH", _NFPROTO_INET, 0, 0)
_GETTABLE_INET = nldump.dump_request((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETTABLE, _NFGENMSG_INET, 1)


def _table_name(buf: bytes, offset: int, end: int) -> str | None:
    """NFTA_TABLE_NAME of one NFT_MSG_NEWTABLE message starting at `offset` (its netlink header)."""
    for kind, a0, a1 in nlattr.walk(buf, offset + nldump.NLMSGHDR.size + len(_NFGENMSG_INET), end):
        if kind == _NFTA_TABLE_NAME:
            # names are bytes to the kernel; a foreign table's need not be UTF-8 (never one of ours)
            return buf[a0:a1].split(b"\0", 1)[0].decode(errors="surrogateescape")
    return None


class _Nfnl:
    """One raw NETLINK_NETFILTER socket in the calling thread's netns: the table-name dump and the
    pre-encoded batches (`nftbatch`), without libnftables. Use as a context manager."""

    def __init__(self) -> None:
        try:
            self._sock = nldump.netfilter_socket()
        except OSError as exc:
            raise NftRulesError(f"netfilter netlink socket: {exc}") from exc

    def __enter__(self) -> _Nfnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def close_later(self) -> None:
        """After a transaction that deleted something: closing the socket waits for an RCU grace
        period (10-15 ms here, engineering notes), so hand it to the closer thread instead of
        stalling the worker. The socket is not used again; `__exit__` then closes nothing."""
        sock = self._sock.dup()  # the closer owns this one; ours is closed now (no wait: a dup remains)
        self._sock.close()
        try:
            _closer().submit(sock.close)
        except RuntimeError:  # interpreter shutting down
            sock.close()

    def table_names(self) -> set[str]:
        """Names of the `inet` tables here, by one NFT_MSG_GETTABLE dump."""
        names: set[str] = set()
        try:
            for rtype, buf, start, end in nldump.dump(self._sock, _GETTABLE_INET):
                if rtype == (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE:
                    name = _table_name(buf, start - nldump.NLMSGHDR.size, end)
                    if name is not None:
                        names.add(name)
        except OSError as exc:
            raise NftRulesError(f"nft table dump failed: {exc}") from exc
        return names

    def commit(self, batch: Batch) -> None:
        """Send the batch; return once the kernel acked its last message. Raises BatchRejected with
        the errno when the kernel refused it: then nothing of it was applied.

        Kernel facts this relies on (net/netfilter/nfnetlink.c): the batch is processed synchronously
        inside `send`, so every answer is already queued when it returns; errors are delivered in
        message order BEFORE the ack of our last message, and that ack is delivered even when the
        batch was aborted. Hence: the first non-zero code decides, and only a clean ack of the last
        sequence number means committed. A failure in the commit phase is reported against the first
        message after BATCH_BEGIN, not the one that caused it.
        """
        try:
            self._sock.send(batch.data)
            while True:
                buf = self._sock.recv(65536)
                for rtype, seq, start, end in nldump.messages(buf):
                    if rtype != nldump.NLMSG_ERROR:
                        continue
                    code = nldump.error_code(buf, start, end)
                    if code:
                        raise BatchRejected(code, f"kernel refused the nft batch (message {seq} of "
                                                  f"{batch.last_seq}): {os.strerror(code)}")
                    if seq == batch.last_seq:
                        return
        except OSError as exc:
            raise NftRulesError(f"nft batch failed: {exc}") from exc


def inet_table_names() -> set[str]:
    """Names of the `inet` tables in the calling thread's netns, by one NFT_MSG_GETTABLE dump.

    Why not libnftables: this is the per-pod "is anything of ours here?" check (before every apply,
    and after every iptables-backend install, spec §10 requirement 3), and on a fresh pod the answer
    is always "no". A plain NETLINK_NETFILTER socket answers in ~0.05 ms; a libnftables context
    plus `list tables` costs ~0.15-0.4 ms. Raises NftRulesError when the kernel refuses (no
    nf_tables); callers decide what that means.
    """
    with _Nfnl() as nl:
        return nl.table_names()


def _our_tables_here(mode: Mode, nft: _Nft | None) -> set[str]:
    """Our table names in this netns: raw dump for the binding mode, `nft list tables` otherwise."""
    if mode == "binding":
        with contextlib.suppress(NftRulesError):  # fall back to libnftables' own listing
            return inet_table_names() & set(NFT_TABLES)
    if nft is None:
        with _Nft(mode) as fresh:
            return _our_table_names(fresh.list("tables"))
    return _our_table_names(nft.list("tables"))


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
def _apply_text(rulesets: tuple[RuleSet, ...], fresh: bool = False) -> str:
    """The serialized apply transaction; cached because building it in Python costs ~0.15 ms per pod
    while pods share a handful of variants (rule sets are frozen, hashable values).

    `fresh` (none of our tables exists, just checked on this worker): the spec's `flush table`
    commands are dropped, since flushing a table created in the same transaction does nothing, and
    each costs libnftables a command to parse and evaluate (~0.05 ms for the three).
    """
    commands = nft_json(rulesets)["nftables"]
    if fresh:
        # no table of ours exists: nothing to flush, and an unused table (raw with DNS capture off)
        # needs no add+delete pair (a delete would make closing the context wait ~12 ms)
        unused = {c["delete"].get("table", {}).get("name") for c in commands if "delete" in c}
        commands = [c for c in commands if "flush" not in c and "delete" not in c
                    and c.get("add", {}).get("table", {}).get("name") not in unused]
    return json.dumps({"nftables": commands}, separators=(",", ":"))


class NftablesBackend:
    """Install, check and remove our nft tables in the current (pod) netns; `mode` is for the benchmark."""

    name = NAME

    def __init__(self, mode: Mode = "binding", *, precompiled: bool = True) -> None:
        self._mode: Mode = mode
        self._precompiled = precompiled and mode == "binding"

    def apply(self, rulesets: Sequence[RuleSet]) -> None:
        """Make our tables exactly the rule sets' content, in one transaction; no-op when already so."""
        present: set[str] | None = None
        if self._precompiled:
            done, present = self._apply_fresh(tuple(rulesets))
            if done:
                return
        self._apply_json(rulesets, present)

    def _apply_fresh(self, rulesets: tuple[RuleSet, ...]) -> tuple[bool, set[str] | None]:
        """The hot path: none of our tables here -> commit the pre-encoded batch (`nftbatch`) on a
        raw netlink socket, no libnftables context at all. Returns (done, our tables found here if
        known). Not done sends the caller down the JSON path: our tables exist (reconcile), the
        variant is not precompilable, or the kernel refused the batch (libnftables then retries the
        same content and reports the authoritative error)."""
        batch = fresh_batch(rulesets)
        if batch is None:
            return False, None
        try:
            with _Nfnl() as nl:
                present = nl.table_names() & set(NFT_TABLES)
                if present:
                    return False, present
                nl.commit(batch)
        except BatchRejected as exc:
            if exc.errno != errno.EEXIST:  # EEXIST: one of our tables appeared meanwhile; reconcile
                log.warning("precompiled nft batch refused; using libnftables", error=str(exc))
            return False, None
        except NftRulesError as exc:
            log.warning("precompiled nft batch not applied; using libnftables", error=str(exc))
            return False, None
        return True, None

    def _apply_json(self, rulesets: Sequence[RuleSet], present: set[str] | None = None) -> None:
        """Our tables exist (or the fresh batch was not possible): read them through libnftables;
        identical -> nothing to do. Different -> one precompiled delete-and-recreate batch (e.g. every
        pod after an upgrade that changed the rules), else libnftables' JSON transaction.
        `present`: our tables here, if the caller just read them (None: read them now)."""
        replace: Batch | None = None
        live: dict[str, NftTableState] = {}
        with _Nft(self._mode) as nft:
            if present is None:
                present = _our_tables_here(self._mode, nft)
            if present:
                live = nft_live_state(nft.list("ruleset"))
                if live == nft_wanted_state(rulesets):
                    return
                replace = replace_batch(tuple(rulesets)) if self._precompiled else None
            if replace is None:
                self._run_json(nft, rulesets, present, live)
                return
        # The listing context is closed by now: it deleted nothing, so that did not wait. The batch
        # deletes our old tables, so its socket's close is left to the closer thread.
        try:
            with _Nfnl() as nl:
                nl.commit(replace)
                nl.close_later()
        except NftRulesError as exc:
            log.warning("precompiled nft replace not applied; using libnftables", error=str(exc))
            with _Nft(self._mode) as nft:
                self._run_json(nft, rulesets, _our_tables_here(self._mode, nft),
                               nft_live_state(nft.list("ruleset")))

    def _run_json(self, nft: _Nft, rulesets: Sequence[RuleSet], present: set[str],
                  live: dict[str, NftTableState]) -> None:
        """libnftables' transaction: fresh, flush-and-refill, or delete-and-recreate."""
        doc: dict[str, Any] | str = _apply_text(tuple(rulesets), not present)
        replacing = False
        wanted = nft_wanted_state(rulesets)
        if present and not all(_flush_repairs(name, state) for name, state in live.items() if name in wanted):
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
        if not _our_tables_here(self._mode, None):
            return False
        with _Nft(self._mode) as nft:
            return nft_live_state(nft.list("ruleset")) == nft_wanted_state(rulesets)

    def present(self) -> bool:
        """Whether any of our tables exists here (cheap: one table-name dump)."""
        return bool(_our_tables_here(self._mode, None))

    def remove(self, families: Sequence[int] = (4, 6)) -> None:
        """Spec §8: delete our three tables in one transaction; absent tables are fine.

        `families` is accepted for interface parity with the iptables backend: `inet` tables hold both.
        """
        del families
        if self._mode != "binding":
            with _Nft(self._mode) as nft:
                nft.run(nft_delete_json(), "remove")
            return
        # The precompiled delete batch on a raw socket, not libnftables: the deletion makes the
        # socket's close wait ~12 ms, and only a plain socket can be closed on another thread.
        with _Nfnl() as nl:
            nl.commit(delete_batch())
            nl.close_later()


def nft_json_supported() -> tuple[bool, str]:
    """Whether libnftables accepts JSON here (some builds answer `JSON support not compiled-in`).

    Read-only: an empty JSON batch and a table-name listing in the calling thread's netns.
    """
    try:
        with _Nft("binding") as nft:
            nft.run({"nftables": []}, "JSON probe")
            nft.list("tables")
    except NftRulesError as exc:
        return False, str(exc)
    return True, "libnftables with JSON support"
