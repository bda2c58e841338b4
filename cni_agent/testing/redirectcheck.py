"""Real-traffic proof that a pod netns redirects as redirect-rules.md §1 says, whatever the backend.

Both rule backends (iptables-legacy, nftables) must produce the same observable behaviour; the
check lives here once so the two backends' tests cannot drift apart in what they demand.
"""

from __future__ import annotations

import socket

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.testing.capture import CaptureListeners


def socket_in(worker: NetnsWorker, fd: int, mark: int | None = None) -> socket.socket:
    """A TCP socket created inside the netns `fd` (optionally with SO_MARK, as ztunnel's own)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.settimeout(5)
        return s

    return worker.call(fd, make)


def check_pod_redirection(
    worker: NetnsWorker,
    cap: CaptureListeners,
    plain: socket.socket,
    pod_fd: int,
    peer_fd: int,
    pod_ip: str,
    peer_ip: str,
) -> None:
    """Outbound -> 15001 and inbound -> 15006 with the original destination kept, HBONE (15008) not
    redirected, ztunnel-marked (0x539) traffic bypassing capture to the real peer.

    `cap` listens in the pod netns; `plain` is a listener on peer_ip:8081 in the peer netns.
    """
    # outbound from the pod -> 15001, original destination preserved
    with socket_in(worker, pod_fd) as c:
        c.connect((peer_ip, 8080))
    out = cap.wait_for(lambda i: i.original_dst == (peer_ip, 8080))
    assert out.port == 15001 and out.peer[0] == pod_ip

    # inbound to the pod -> 15006
    with socket_in(worker, peer_fd) as c:
        c.connect((pod_ip, 9090))
    inbound = cap.wait_for(lambda i: i.original_dst == (pod_ip, 9090))
    assert inbound.port == 15006 and inbound.peer[0] == peer_ip

    # HBONE port is never redirected: lands on 15008 directly
    with socket_in(worker, peer_fd) as c:
        c.connect((pod_ip, 15008))
    hbone = cap.wait_for(lambda i: i.port == 15008)
    assert hbone.original_dst == (pod_ip, 15008)

    # ztunnel-marked traffic from the pod bypasses capture and reaches the real peer
    with socket_in(worker, pod_fd, mark=0x539) as c:
        c.connect((peer_ip, 8081))
        plain.settimeout(5)
        accepted, addr = plain.accept()
        accepted.close()
    assert addr[0] == pod_ip
    assert not any(i.original_dst[1] == 8081 for i in cap.intercepted)
