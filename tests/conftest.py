"""Shared test policy.

Tests marked `root` need real kernel objects (netns, iptables, nft, containerd). Without root they
skip with a reason; under CI=true a skip would hide a regression, so they fail instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Shared helpers that assert on behalf of tests: give their failures pytest's detailed diffs too.
pytest.register_assert_rewrite("cni_agent.testing.redirectcheck", "cni_agent.testing.zdsharness")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("CI=true and this test needs root: refusing to skip", pytrace=False)
    pytest.skip("needs root (real netns, iptables, sockets); run as root")


def _host_network_state() -> dict[str, str]:
    """What our code must never change in the real host netns: rules, ip rules, table 100, nft tables."""
    cmds = {
        "iptables-legacy": ["iptables-legacy-save"],
        "ip6tables-legacy": ["ip6tables-legacy-save"],
        "nft": ["nft", "list", "ruleset"],
        "ip-rule": ["ip", "rule", "show"],
        "ip-6-rule": ["ip", "-6", "rule", "show"],
        "table-100": ["ip", "route", "show", "table", "100"],
    }
    state = {}
    for name, argv in cmds.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
        except FileNotFoundError:
            out = "(missing)"
        # counters and timestamps move on their own
        lines = [ln.split(" [")[0] for ln in out.splitlines() if not ln.startswith("#")]
        state[name] = "\n".join(ln for ln in lines if "istio" in ln.lower() or "ISTIO" in ln or name != "nft")
    return state


@pytest.fixture(scope="session", autouse=True)
def _host_netns_untouched() -> Iterator[None]:
    """Guard for the whole run: no test may leave rules of ours (or any change) in the host netns."""
    if os.geteuid() != 0:
        yield
        return
    before = _host_network_state()
    yield
    after = _host_network_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        detail = "\n".join(f"--- {k} before:\n{b}\n--- {k} after:\n{a}" for k, (b, a) in changed.items())
        pytest.fail(f"the test run changed the host network namespace:\n{detail}", pytrace=False)
