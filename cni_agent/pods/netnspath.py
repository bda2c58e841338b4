"""Turn a CNI_NETNS value into a path the agent may open, without being tricked by symlinks.

A CNI request names a path on the *host*; the agent may see the host's root under a prefix
(`/host` in the DaemonSet). Symlinks are resolved by hand inside that root (an absolute link target
such as Debian's `/var/run -> /run` must stay inside the prefix), and only the netns roots or a
process's `ns/net` are accepted. `/proc/<pid>/ns/net` is a magic link whose target is not a path,
so that form is matched before anything is resolved.
"""

from __future__ import annotations

import os
import re

from cni_agent.pods.policy import netns_path_allowed

_PROC_FORM = re.compile(r"/proc/[0-9]+(/task/[0-9]+)?/ns/net")
MAX_LINKS = 40


class NetnsPathError(ValueError):
    """The path is not one we open; the message says why and what is allowed."""


def resolve_in_root(root: str, path: str) -> str:
    """Resolve `path` (absolute, host view) as if `root` were `/`; returns the host-view result."""
    root = root.rstrip("/")
    pending = [c for c in path.split("/") if c]
    done: list[str] = []
    hops = 0
    while pending:
        comp = pending.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        full = root + "/" + "/".join([*done, comp])
        if os.path.islink(full):
            hops += 1
            if hops > MAX_LINKS:
                raise NetnsPathError(f"too many symlinks resolving {path!r}")
            target = os.readlink(full)
            if target.startswith("/"):
                done = []
            pending = [c for c in target.split("/") if c] + pending
            continue
        done.append(comp)
    return "/" + "/".join(done)


def host_netns_path(netns: str, *, prefix: str = "", host_proc: str = "/proc") -> str:
    """The agent-side path to open for a CNI_NETNS value, or NetnsPathError."""
    if not netns.startswith("/") or os.path.normpath(netns) != netns:
        raise NetnsPathError(f"CNI_NETNS {netns!r} must be a clean absolute path")
    if _PROC_FORM.fullmatch(netns):
        return host_proc.rstrip("/") + netns[len("/proc") :]
    resolved = resolve_in_root(prefix or "/", netns)
    if not netns_path_allowed(resolved):
        raise NetnsPathError(
            f"CNI_NETNS {netns!r} (resolves to {resolved}) is not under an allowed netns root: "
            "/var/run/netns/<name>, /run/netns/<name> or /proc/<pid>/ns/net"
        )
    return (prefix.rstrip("/") + resolved) if prefix else resolved
