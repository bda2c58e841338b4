"""Run a real `cni-agent run --pod-source local` process in a temp dir (tests and benchmarks).

A subprocess, not an in-process object, so tests see exactly what an operator would: the CLI,
flag parsing, signal handling and the restart path (state reloaded from the run dir).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class AgentProcess:
    def __init__(self, workdir: Path, *, extra_args: Sequence[str] = (), netns: str = "") -> None:
        """`netns`: run the agent inside that named netns (a test "node"), so host-side rules it
        installs (probe SNAT, probe sets) stay there instead of landing on the real host.
        Without it the host probe is disabled, for the same reason."""
        self.workdir = workdir
        self.netns = netns
        self.run_dir = workdir / "run"
        self.ztunnel_socket = workdir / "ztunnel" / "ztunnel.sock"
        self.log_path = workdir / "agent.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def plugin_socket(self) -> Path:
        return self.run_dir / "plugin.sock"

    def argv(self) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        probe = [] if self.netns else ["--host-probe", "false"]
        return [
            *prefix,
            sys.executable,
            "-m",
            "cni_agent",
            "run",
            "--pod-source",
            "local",
            "--run-dir",
            str(self.run_dir),
            "--ztunnel-socket",
            str(self.ztunnel_socket),
            "--metrics-port",
            "0",
            "--health-port",
            "0",
            "--log-level",
            "debug",
            *probe,
            *self.extra_args,
        ]

    def start(self, timeout: float = 20.0) -> AgentProcess:
        """Start and wait until the plugin socket answers (the ready marker may predate a restart)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        marker = self.run_dir / "ready"
        marker.unlink(missing_ok=True)
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if marker.exists():
                return self
            time.sleep(0.02)
        raise TimeoutError(f"agent not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
