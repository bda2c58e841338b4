"""Run CNI plugins the way libcni does, for tests and the demo.

A conflist is executed plugin by plugin: each gets its entry plus the list's `cniVersion` and
`name`, and (after the first) the previous plugin's result as `prevResult`; DEL runs in reverse
with the cached final result. Plugins are exec'd inside a chosen "node" netns so that tests never
touch the host's network.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class CniExecError(RuntimeError):
    """A plugin failed: carries which plugin, its CNI error code and message."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str, stderr: str) -> None:
        super().__init__(
            f"{plugin} {command} failed: code {code}: {msg}" + (f" ({details})" if details else "")
        )
        self.plugin, self.command, self.code, self.msg, self.details, self.stderr = (
            plugin,
            command,
            code,
            msg,
            details,
            stderr,
        )


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        out = json.loads(self.stdout) if self.stdout.strip() else {}
        assert isinstance(out, dict)
        return out


@dataclass
class CniRunner:
    """Executes plugins found on `cni_path`, optionally inside the netns named `node_netns`."""

    cni_path: Sequence[str]
    node_netns: str = ""
    timeout: float = 60.0
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            candidate = os.path.join(d, plugin_type)
            if os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"failed to find plugin {plugin_type!r} in path {list(self.cni_path)}")

    def exec(self, plugin_type: str, command: str, stdin: bytes, env: Mapping[str, str]) -> ExecResult:
        argv = [self.find(plugin_type)]
        if self.node_netns:
            argv = ["ip", "netns", "exec", self.node_netns, *argv]
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            **self.extra_env,
            **env,
            "CNI_COMMAND": command,
            "CNI_PATH": ":".join(self.cni_path),
        }
        proc = subprocess.run(
            argv, input=stdin, env=full_env, capture_output=True, timeout=self.timeout, check=False
        )
        return ExecResult(
            proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )

    def _run(
        self, plugin: Mapping[str, Any], command: str, conf: dict[str, Any], env: Mapping[str, str]
    ) -> ExecResult:
        res = self.exec(str(plugin["type"]), command, json.dumps(conf).encode(), env)
        if res.returncode != 0:
            try:
                err = res.json()
            except ValueError:
                err = {"code": 999, "msg": res.stdout or res.stderr}
            raise CniExecError(
                str(plugin["type"]),
                command,
                int(err.get("code", 999)),
                str(err.get("msg", "")),
                str(err.get("details", "")),
                res.stderr,
            )
        return res

    @staticmethod
    def _conf(
        conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev: dict[str, Any] | None
    ) -> dict[str, Any]:
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf["cniVersion"] = conflist["cniVersion"]
        conf["name"] = conflist["name"]
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    @staticmethod
    def env(container_id: str, netns: str, ifname: str, args: Mapping[str, str]) -> dict[str, str]:
        env = {
            "CNI_CONTAINERID": container_id,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in args.items()),
        }
        if netns:
            env["CNI_NETNS"] = netns
        return env

    def add(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        env = self.env(container_id, netns, ifname, args or {})
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            prev = self._run(plugin, "ADD", self._conf(conflist, plugin, prev), env).json()
        return prev or {}

    def delete(
        self,
        conflist: Mapping[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: Mapping[str, str] | None = None,
        prev_result: dict[str, Any] | None = None,
    ) -> None:
        env = self.env(container_id, netns, ifname, args or {})
        for plugin in reversed(list(conflist["plugins"])):
            self._run(plugin, "DEL", self._conf(conflist, plugin, prev_result), env)
