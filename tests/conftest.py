"""Shared test policy.

Tests marked `root` need real kernel objects (netns, iptables, nft, containerd). Without root they
skip with a reason; under CI=true a skip would hide a regression, so they fail instead.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("CI=true and this test needs root: refusing to skip", pytrace=False)
    pytest.skip("needs root (real netns, iptables, sockets); run as root")
