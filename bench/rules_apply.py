"""In-pod rule apply (routes + rules) in a fresh pod netns, per backend, vs istio's subprocess sequence.

Every sample gets a fresh netns (created outside the timed region) and the variants are interleaved
round by round, so all of them see the same machine conditions in the same run. Timed per pod:
- `nft`: routes (pyroute2) + NftablesBackend (libnftables binding, one JSON transaction);
- `nft-subprocess`: the same with `nft -j -f -` (the alternative the nft backend was chosen against);
- `iptables-legacy`: routes + IptablesLegacyBackend (python-iptables / libiptc);
- `istio-subprocess`: what istio-cni runs inside the pod netns: `iptables-save`, `iptables -C` per rule,
  `ip rule add`, `ip route replace`, `iptables-restore --noflush -v` of Block A (legacy binaries).
Each timed job goes through the NetnsWorker (setns in, work, setns home), as in the agent.
Targets (issue 4): <= 1.5 ms added per pod, >= 8x faster than the subprocess sequence.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from cni_agent.redirect.iptc import IptablesLegacyBackend
from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.nft import NftablesBackend
from cni_agent.redirect.routes import apply_routes
from cni_agent.redirect.rules import RuleSet, RuleSettings, build_ruleset, render_iptables_restore
from cni_agent.testing.netns import TestNetns

N = int(os.environ.get("BENCH_RULES_N", "40"))
TARGET_MS = 1.5
TARGET_RATIO = 8.0

Sample = tuple[float, float, float]  # total, routes, rules (ms)


def _timed_job(rules: Callable[[], None]) -> Callable[[], tuple[float, float]]:
    def job() -> tuple[float, float]:
        t0 = time.perf_counter()
        apply_routes(False)
        t1 = time.perf_counter()
        rules()
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    return job


def _run(argv: list[str], input: str | None = None, check: bool = True) -> None:
    subprocess.run(argv, input=input, capture_output=True, text=True, check=check)


def istio_sequence(rs: RuleSet) -> Callable[[], tuple[float, float]]:
    """istio-cni's per-pod commands, run from inside the pod netns (children inherit the thread's)."""
    restore_input = render_iptables_restore(rs)

    def job() -> tuple[float, float]:
        t0 = time.perf_counter()
        _run(["iptables-legacy-save"])
        for rule in rs.rules:  # "is it already there?" for every rule
            _run(["iptables-legacy", "-t", rule.table, "-C", rule.chain, *rule.spec], check=False)
        t1 = time.perf_counter()
        _run(["ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"])
        _run(["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        t2 = time.perf_counter()
        _run(["iptables-legacy-restore", "--noflush", "-v"], input=restore_input)
        t3 = time.perf_counter()
        return (t2 - t1) * 1000, ((t1 - t0) + (t3 - t2)) * 1000

    return job


def measure(worker: NetnsWorker, variants: dict[str, Callable[[], Callable[[], tuple[float, float]]]],
            n: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    for i in range(n + 2):  # first two rounds warm caches (libs, modules), not recorded
        for name, make in variants.items():
            with TestNetns() as ns:
                fd = ns.open()
                job = make()
                t0 = time.perf_counter()
                routes_ms, rules_ms = worker.call(fd, job)
                total = (time.perf_counter() - t0) * 1000
            if i >= 2:
                samples[name].append((total, routes_ms, rules_ms))
    return samples


def main() -> int:
    if os.geteuid() != 0:
        print("rules benchmark needs root (network namespaces)", file=sys.stderr)
        return 2
    rs = build_ruleset(RuleSettings(), 4)
    variants: dict[str, Callable[[], Callable[[], tuple[float, float]]]] = {
        "nft": lambda: _timed_job(lambda: NftablesBackend().apply([rs])),
        "nft-subprocess": lambda: _timed_job(lambda: NftablesBackend(mode="subprocess").apply([rs])),
        "iptables-legacy": lambda: _timed_job(lambda: IptablesLegacyBackend().apply([rs])),
        "istio-subprocess": lambda: istio_sequence(rs),
    }
    with NetnsWorker(name="bench-rules") as worker:
        samples = measure(worker, variants, N)

    med = {name: tuple(statistics.median(s[k] for s in vals) for k in range(3))
           for name, vals in samples.items()}
    base = med["istio-subprocess"][0]
    print(f"rule apply in a fresh pod netns, IPv4 Block A/F rule set, median of {N} (ms):")
    print(f"  {'variant':<18} {'total':>8} {'routes':>8} {'rules':>8} {'speed-up vs istio':>18}")
    for name, (total, routes_ms, rules_ms) in med.items():
        print(f"  {name:<18} {total:8.3f} {routes_ms:8.3f} {rules_ms:8.3f} {base / total:17.1f}x")
    for name in ("nft", "iptables-legacy"):
        total, _routes, rules_ms = med[name]
        ratio = base / total
        print(f"  {name}: {total:.3f} ms per pod (routes+rules) -> <= {TARGET_MS} ms target "
              f"{'MET' if total <= TARGET_MS else 'NOT met'}; rules alone {rules_ms:.3f} ms "
              f"{'MET' if rules_ms <= TARGET_MS else 'NOT met'}")
        print(f"  {name}: {ratio:.1f}x faster than istio's subprocess sequence -> "
              f">= {TARGET_RATIO:g}x target "
              f"{'MET' if ratio >= TARGET_RATIO else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
