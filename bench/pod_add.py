"""The whole agent-side ADD of an enrolled pod, per rules backend, on a local node (LocalEnv).

Why this exists besides the rules benchmark: the rules are under 1 ms, but an enrolment also
opens the netns, persists the registry, waits for ztunnel's ack and upserts the host probe set.
Two of those once cost 10-15 ms each without the rules benchmark noticing (engineering notes).

Numbers come from the agent's own "pod enrolled" log line (per-step milliseconds, measured inside
the agent) and "CNI request" line (the whole handler), for pods added one after another through the
real CNI chain (bridge, host-local, our shim) and a ztunnel-like peer in this process. That peer is
Python: a real ztunnel acks faster, so `ztunnel_ms` here is an upper bound.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import structlog

from cni_agent.testing.localenv import LocalEnv

N = int(os.environ.get("BENCH_ADD_N", "30"))
WARMUP = 3
BACKENDS = ("nftables", "iptables-legacy")
STEPS = ("netns_ms", "rules_ms", "persist_ms", "ztunnel_ms", "probe_ms")
REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "bin" / "ambient-cni"


def _records(log_text: str, event: str) -> list[dict[str, object]]:
    out = []
    for line in log_text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def measure(backend: str, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="acni-bench-add-") as tmp:
        env = LocalEnv(Path(tmp), SHIM, rules_backend=backend, agent_args=("--log-level", "info"))
        try:
            env.start()
            for i in range(n + WARMUP):
                env.node.add_pod(f"bench-{i}", "bench")
            log_text = env.agent.log()
        finally:
            env.close()
    enrolled = _records(log_text, "pod enrolled")[WARMUP:]
    handled = [r for r in _records(log_text, "CNI request") if r.get("command") == "ADD"][WARMUP:]
    if len(enrolled) != n or len(handled) != n:
        raise RuntimeError(f"{backend}: expected {n} enrolments, the agent log has {len(enrolled)} "
                           f"enrolments and {len(handled)} ADD requests")
    result = {step: statistics.median(float(str(r[step])) for r in enrolled) for step in STEPS}
    result["handler_ms"] = statistics.median(float(str(r["ms"])) for r in handled)
    return result


def main() -> int:
    if os.geteuid() != 0:
        print("pod ADD benchmark needs root (network namespaces)", file=sys.stderr)
        return 2
    if not SHIM.exists():
        print(f"build the shim first: make plugin ({SHIM} missing)", file=sys.stderr)
        return 2
    # the peer's and the node's own logs are not the point here
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"agent-side ADD of an enrolled pod, {N} pods one after another (median ms; from the agent's log):")
    print(f"  {'backend':<16} {'handler':>8} " + " ".join(f"{s[:-3]:>8}" for s in STEPS))
    for backend in BACKENDS:
        r = measure(backend, N)
        print(f"  {backend:<16} {r['handler_ms']:8.2f} " + " ".join(f"{r[s]:8.2f}" for s in STEPS))
    print("  (handler: the whole CNI request in the agent; ztunnel: the ack from the Python peer, an upper"
          " bound for a real ztunnel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
