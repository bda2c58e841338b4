"""Which rule backend this node uses: decided once, persisted in the run dir, never flipped silently.

Spec redirect-rules.md §10. The reference re-detects on every start and its legacy probe *writes* a
test rule, which instantiates the legacy nat table, so the next start sees "legacy rules" and flips
nft → legacy, duplicating every pod's rules. Here:
- detection is read-only: `/proc/net/ip{,6}_tables_names` (tables that already exist), the
  `iptables-legacy-save` / `ip6tables-legacy-save` of exactly those tables (no `-t`, which would
  instantiate a table), `nft -j list ruleset`, `ipset list -n`; nothing is ever created to probe;
- only real rules are evidence: `-A` lines and nft rule objects, never chain declarations or empty
  tables (this host's empty legacy ip6 nat table proves nothing);
- the decision is written to `<run_dir>/rules-backend` (atomic rename) and reused on restart; a
  persisted choice that stopped working is a loud `BackendError` that says what to do;
- an explicit `--rules-backend` wins over the file (logged) and rewrites it.
`decide` is pure so the policy is unit-tested with fake detections; `detect_host` is the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cni_agent.redirect.rules import PROBE_SET_V4, PROBE_SET_V6

log = structlog.get_logger("cni_agent.redirect.backend")

LEGACY = "iptables-legacy"
NFTABLES = "nftables"
AUTO = "auto"
BACKENDS: tuple[str, ...] = (LEGACY, NFTABLES)
STATE_FILE = "rules-backend"
_EVIDENCE_SAMPLES = 3


class BackendError(Exception):
    """The rule backend cannot be chosen or the persisted one no longer works; fatal at startup."""


@dataclass(frozen=True)
class HostDetection:
    """Read-only facts about the host netns and the kernel/tools (what `detect_host` found)."""

    legacy_rules: tuple[str, ...] = ()
    """Real rules (`-A ...` lines, with table) in the host's legacy iptables, v4 and v6."""
    nft_rules: tuple[str, ...] = ()
    """Real rules in the host's nftables ruleset (`family table/chain`), incl. iptables-nft's tables."""
    istio_ipsets: tuple[str, ...] = ()
    """Istio's probe ipsets that already exist (left by an iptables-based agent)."""
    legacy_usable: bool = False
    legacy_detail: str = ""
    nft_usable: bool = False
    nft_detail: str = ""

    def usable(self, backend: str) -> tuple[bool, str]:
        if backend == LEGACY:
            return self.legacy_usable, self.legacy_detail
        if backend == NFTABLES:
            return self.nft_usable, self.nft_detail
        return False, f"unknown backend {backend!r}"


@dataclass(frozen=True)
class BackendChoice:
    """The backend to use; `persisted` = taken from the run-dir file written by an earlier start."""

    name: str
    evidence: str
    persisted: bool


@dataclass(frozen=True)
class Decision:
    """Outcome of the pure policy: the choice, whether to (re)write the file, and a warning to log."""

    choice: BackendChoice
    write: bool
    warning: str | None = None


def _sample(items: tuple[str, ...]) -> str:
    shown = "; ".join(items[:_EVIDENCE_SAMPLES])
    more = f" (+{len(items) - _EVIDENCE_SAMPLES} more)" if len(items) > _EVIDENCE_SAMPLES else ""
    return f"{shown}{more}"


def decide(detection: HostDetection, requested: str, persisted: str | None, state_path: str) -> Decision:
    """The §10 policy, pure. Raises BackendError when no usable backend can be chosen."""
    if requested not in (AUTO, *BACKENDS):
        raise BackendError(f"--rules-backend {requested!r} is not one of auto, {', '.join(BACKENDS)}")
    if persisted is not None and persisted not in BACKENDS:
        raise BackendError(
            f"{state_path} holds {persisted!r}, not a known rule backend; fix or delete the file "
            f"(deleting it re-detects from the host), or pass --rules-backend {LEGACY}|{NFTABLES}"
        )

    if requested != AUTO:
        ok, detail = detection.usable(requested)
        if not ok:
            raise BackendError(
                f"--rules-backend {requested} was requested but does not work on this node: {detail}; "
                f"install/enable it or choose another backend"
            )
        warning = None
        if persisted is not None and persisted != requested:
            warning = (f"operator override: --rules-backend {requested} replaces the persisted {persisted} "
                       f"in {state_path}; pods enrolled under {persisted} are cleaned on their next install")
        evidence = f"requested explicitly (--rules-backend {requested}); {detail}"
        return Decision(BackendChoice(requested, evidence, persisted=False), write=persisted != requested,
                        warning=warning)

    if persisted is not None:
        ok, detail = detection.usable(persisted)
        if not ok:
            other = NFTABLES if persisted == LEGACY else LEGACY
            raise BackendError(
                f"the rule backend {persisted} persisted in {state_path} no longer works: {detail}. "
                f"Restore it (kernel modules / tools), or pass --rules-backend {other} explicitly to switch "
                f"(pods are migrated on their next install), or delete {state_path} to re-detect. "
                f"Refusing to flip silently: pods already hold {persisted} rules."
            )
        return Decision(BackendChoice(persisted, f"persisted in {state_path}; {detail}", persisted=True),
                        write=False)

    if detection.legacy_rules and detection.legacy_usable:
        evidence = f"host uses legacy iptables: {_sample(detection.legacy_rules)}"
        return Decision(BackendChoice(LEGACY, evidence, persisted=False), write=True)
    if detection.istio_ipsets and detection.legacy_usable:
        evidence = f"istio probe ipsets already exist on the host: {', '.join(detection.istio_ipsets)}"
        return Decision(BackendChoice(LEGACY, evidence, persisted=False), write=True)
    if detection.nft_usable:
        if detection.nft_rules:
            evidence = f"host uses nftables: {_sample(detection.nft_rules)}"
        elif detection.legacy_rules:
            evidence = (f"legacy rules found ({_sample(detection.legacy_rules)}) but legacy iptables is not "
                        f"usable ({detection.legacy_detail}); nftables works")
        else:
            evidence = ("no rules on the host in either backend; nftables is supported "
                        f"({detection.nft_detail})")
        return Decision(BackendChoice(NFTABLES, evidence, persisted=False), write=True)
    if detection.legacy_usable:
        evidence = f"nftables not usable ({detection.nft_detail}); legacy iptables works"
        return Decision(BackendChoice(LEGACY, evidence, persisted=False), write=True)
    raise BackendError(
        f"no usable rule backend: nftables: {detection.nft_detail}; "
        f"iptables-legacy: {detection.legacy_detail}"
    )


# --- read-only host detection ----------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _existing_tables(proc_file: str) -> list[str] | None:
    """Legacy tables that exist in the host netns; None when the x_tables module is not loaded."""
    try:
        with open(proc_file) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return None


def legacy_rules_from_save(save_output: str, tool: str) -> list[str]:
    """`-A` lines of an iptables-save dump as "tool table: rule"; chain declarations do not count."""
    rules: list[str] = []
    table = "?"
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            rules.append(f"{tool} {table}: {line}")
    return rules


def nft_rules_from_listing(listing: dict[str, Any]) -> list[str]:
    """Rule objects of `nft -j list ruleset`, as "family table/chain"; tables and chains do not count."""
    found: list[str] = []
    for obj in listing.get("nftables", []):
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if isinstance(rule, dict):
            found.append(f"{rule.get('family')} {rule.get('table')}/{rule.get('chain')}")
    return found


def _detect_legacy() -> tuple[list[str], bool, str]:
    rules: list[str] = []
    have_binary = shutil.which("iptables-legacy-save") is not None
    v4 = _existing_tables("/proc/net/ip_tables_names")
    for tool, tables in (("iptables-legacy-save", v4),
                         ("ip6tables-legacy-save", _existing_tables("/proc/net/ip6_tables_names"))):
        if not tables:  # nothing instantiated: nothing to dump (and dumping must not create tables)
            continue
        res = _run([tool])  # no -t: dumps only existing tables
        if res is not None and res.returncode == 0:
            rules += legacy_rules_from_save(res.stdout, tool)
    try:
        import iptc  # noqa: F401  (python-iptables drives legacy; libiptc must load)
    except Exception as exc:  # pragma: no cover - broken install
        return rules, False, f"python-iptables unusable: {exc}"
    if v4 is None and not _module_available("ip_tables"):
        return rules, False, "kernel has no ip_tables (legacy x_tables) support"
    detail = "legacy x_tables available" + ("" if have_binary else " (iptables-legacy tools not installed)")
    return rules, True, detail


def _module_available(name: str) -> bool:
    """Loadable or built in, by the module index (read-only, no modprobe)."""
    release = os.uname().release
    for index in ("modules.dep", "modules.builtin"):
        path = f"/lib/modules/{release}/{index}"
        with contextlib.suppress(OSError), open(path) as f:
            if any(f"/{name}.ko" in line for line in f):
                return True
    return False


def _detect_nft() -> tuple[list[str], bool, str]:
    from cni_agent.redirect.nft import nft_json_supported  # libnftables only when needed

    ok, detail = nft_json_supported()
    rules: list[str] = []
    res = _run(["nft", "-j", "list", "ruleset"])
    if res is not None and res.returncode == 0 and res.stdout.strip():
        with contextlib.suppress(ValueError):
            rules = nft_rules_from_listing(json.loads(res.stdout))
    elif res is not None and "JSON support not compiled-in" in res.stderr:
        ok, detail = False, "nft: JSON support not compiled-in"
    return rules, ok, detail


def _detect_ipsets() -> list[str]:
    res = _run(["ipset", "list", "-n"])
    if res is None or res.returncode != 0:
        return []
    names = set(res.stdout.split())
    return [s for s in (PROBE_SET_V4, PROBE_SET_V6) if s in names]


def detect_host() -> HostDetection:
    """Read-only detection; must run in the host netns (the agent's main thread at startup)."""
    legacy_rules, legacy_ok, legacy_detail = _detect_legacy()
    nft_rules, nft_ok, nft_detail = _detect_nft()
    return HostDetection(
        legacy_rules=tuple(legacy_rules), nft_rules=tuple(nft_rules), istio_ipsets=tuple(_detect_ipsets()),
        legacy_usable=legacy_ok, legacy_detail=legacy_detail, nft_usable=nft_ok, nft_detail=nft_detail,
    )


# --- persistence -----------------------------------------------------------------------------------


def read_persisted(run_dir: Path) -> str | None:
    try:
        return (run_dir / STATE_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def write_persisted(run_dir: Path, name: str) -> None:
    """Atomic replace: a crash leaves the old or the new choice, never a torn file."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir / STATE_FILE
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def select_backend(
    run_dir: Path, requested: str, *, host_probe: Callable[[], HostDetection] = detect_host
) -> BackendChoice:
    """Decide (or reuse) the node's backend, persist it, log decision and evidence."""
    state_path = str(run_dir / STATE_FILE)
    persisted = read_persisted(run_dir)
    decision = decide(host_probe(), requested, persisted, state_path)
    if decision.warning:
        log.warning("rules backend override", detail=decision.warning)
    if decision.write:
        write_persisted(run_dir, decision.choice.name)
    log.info("rules backend", backend=decision.choice.name, evidence=decision.choice.evidence,
             persisted=decision.choice.persisted, state_file=state_path)
    return decision.choice
