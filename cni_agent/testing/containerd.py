"""A throwaway containerd (Debian's 1.6) with our CNI chain, for the e2e tests.

The shim's contract is only proven when a real runtime execs it: containerd builds the stdin, the
`CNI_ARGS`, the netns and the DEL sequence itself. This harness runs a private containerd with its
own config, root, state dir, socket and CNI dirs, so it never touches a system containerd. There is
no registry access, so the sandbox ("pause") image is built locally: a tiny static Go program packed
by Python as an OCI image layout tarball and imported with `ctr`.

containerd runs CNI plugins in its own (the host) netns, so the bridge lives in the host netns. It
is isolated: a private subnet, no gateway address, no masquerade, no route changes; `close()` removes
the bridge, leftover veths, sandbox netns, mounts, cgroups and processes the runtime left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cni_agent.testing.cri import CriClient, CriError

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "build" / "e2e"
SYSTEM_CNI_DIR = Path("/usr/lib/cni")
IMAGE_REF = "acni.invalid/e2e/pause:1"
NETWORK_NAME = "acni-e2e"
BRIDGE = "acni-e2e0"
SUBNET = "10.251.0.0/24"
CGROUP_PARENT = "/acni-e2e"
K8S_NS = "k8s.io"
LIBCNI_CACHE = Path("/var/lib/cni/results")

# The sandbox process only has to exist until it is killed; exiting on TERM/INT keeps stop fast.
PAUSE_GO = """\
// Command pause is the e2e sandbox image's entrypoint: it waits for a signal and exits.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tc := make(chan os.Signal, 1)
\tsignal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
\t<-c
\tos.Exit(0)
}
"""


class ContainerdError(RuntimeError):
    """containerd could not be started or prepared; the message carries its log tail."""


def _go() -> str:
    return shutil.which("go") or "/usr/local/go/bin/go"


def build_pause_binary(build_dir: Path = BUILD_DIR) -> Path:
    """Static pause binary, cached in build/ and rebuilt when missing or when the source changes."""
    src_dir = build_dir / "pause-src"
    binary = build_dir / "pause"
    main_go = src_dir / "main.go"
    if binary.exists() and main_go.exists() and main_go.read_text() == PAUSE_GO:
        return binary
    src_dir.mkdir(parents=True, exist_ok=True)
    main_go.write_text(PAUSE_GO)
    (src_dir / "go.mod").write_text("module acnipause\n\ngo 1.19\n")
    binary.unlink(missing_ok=True)
    proc = subprocess.run(
        [_go(), "build", "-trimpath", "-ldflags=-s -w", "-o", str(binary), "."],
        cwd=src_dir,
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ContainerdError(f"building the pause binary failed:\n{proc.stderr}")
    return binary


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_pause_image(build_dir: Path = BUILD_DIR, ref: str = IMAGE_REF) -> Path:
    """An OCI image layout tarball holding just /pause; cached and rebuilt when its inputs change."""
    binary = build_pause_binary(build_dir)
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        _tar_add(layer, "pause", binary.read_bytes(), 0o755)
    layer_blob = layer_buf.getvalue()
    config_blob = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_sha(layer_blob)]},
            "history": [{"created_by": "cni_agent.testing.containerd", "comment": "e2e sandbox image"}],
        }
    )
    manifest_blob = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha(config_blob),
                "size": len(config_blob),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _sha(layer_blob),
                    "size": len(layer_blob),
                }
            ],
        }
    )
    index_blob = _json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _sha(manifest_blob),
                    "size": len(manifest_blob),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref,
                    },
                }
            ],
        }
    )
    out = build_dir / f"pause-image-{hashlib.sha256(index_blob).hexdigest()[:12]}.tar"
    if out.exists():
        return out
    for stale in build_dir.glob("pause-image-*.tar"):
        stale.unlink()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _tar_add(tar, "index.json", index_blob)
        for blob in (layer_blob, config_blob, manifest_blob):
            _tar_add(tar, "blobs/sha256/" + _sha(blob).split(":", 1)[1], blob)
    os.replace(tmp, out)
    return out


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)


def _mountpoints_under(prefixes: Sequence[Path]) -> list[str]:
    """Mount points below any prefix, deepest first (so nested mounts go before their parents)."""
    points: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if any(mnt == str(p) or mnt.startswith(f"{p}/") for p in prefixes):
                points.append(mnt)
    return sorted(set(points), key=lambda m: m.count("/"), reverse=True)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class ContainerdHarness:
    """`with ContainerdHarness(workdir, shim=..., agent_socket=...) as ctd:`, then `ctd.run_pod(...)`."""

    def __init__(
        self,
        workdir: Path,
        *,
        shim: Path = REPO / "build" / "bin" / "ambient-cni",
        agent_socket: Path = Path("/var/run/ambient-cni/plugin.sock"),
        exclude_namespaces: Sequence[str] = ("kube-system",),
        cni_version: str = "1.0.0",
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = workdir
        self.shim = shim
        self.agent_socket = agent_socket
        self.exclude_namespaces = list(exclude_namespaces)
        self.cni_version = cni_version
        self.start_timeout = start_timeout
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.config_path = workdir / "containerd.toml"
        self.log_path = workdir / "containerd.log"
        self.bin_dir = workdir / "cni-bin"
        self.conf_dir = workdir / "cni-conf"
        self.ipam_dir = workdir / "ipam"
        self.pod_logs = workdir / "pods"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cri: CriClient | None = None
        self.netns_paths: set[str] = set()
        self.sandbox_ids: set[str] = set()
        self._seen_sandboxes: set[str] = set()  # for the libcni cache cleanup at close()

    # ---- setup -------------------------------------------------------------------------------

    def conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": self.cni_version,
            "name": NETWORK_NAME,
            "plugins": [
                # No gateway: nothing is routed to or from the host; no masquerade either.
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET}]],
                        "dataDir": str(self.ipam_dir),
                    },
                },
                {
                    "type": "ambient-cni",
                    "agent_socket": str(self.agent_socket),
                    "exclude_namespaces": self.exclude_namespaces,
                    "pod_namespace": "istio-system",
                    "pod_name_prefix": "ambient-cni-node-",
                    "log_level": "debug",
                },
            ],
        }

    def config_toml(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        disabled = [
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.native",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        return f"""\
version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = {json.dumps(disabled)}

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root}/opt"

[{cri}]
  sandbox_image = "{IMAGE_REF}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
  Root = "{self.state}/runc"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{self.conf_dir}"
  max_conf_num = 1
"""

    def _prepare(self) -> Path:
        image = build_pause_image()
        for d in (self.root, self.state, self.bin_dir, self.conf_dir, self.ipam_dir, self.pod_logs):
            d.mkdir(parents=True, exist_ok=True)
        for plugin in SYSTEM_CNI_DIR.iterdir():
            link = self.bin_dir / plugin.name
            link.unlink(missing_ok=True)
            link.symlink_to(plugin)
        shim_link = self.bin_dir / "ambient-cni"
        shim_link.unlink(missing_ok=True)
        shim_link.symlink_to(self.shim.resolve())
        (self.conf_dir / "10-acni-e2e.conflist").write_text(json.dumps(self.conflist(), indent=1) + "\n")
        self.config_path.write_text(self.config_toml())
        # A crashed earlier run may have left the bridge behind; host-local state is per workdir.
        self._remove_bridge()
        return image

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no containerd log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, what: str) -> ContainerdError:
        return ContainerdError(f"{what}\n--- containerd log tail ({self.log_path}) ---\n{self.log_tail()}")

    def start(self) -> ContainerdHarness:
        """Start containerd, wait for CRI to answer, import the sandbox image. Raises with the log tail."""
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            raise ContainerdError("containerd/ctr not installed (Debian package `containerd`; `make deps`)")
        image = self._prepare()
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        try:
            self._wait_ready()
            self._import_image(image)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise self._fail(f"containerd exited with {self.proc.returncode} during startup")
            if self.socket.exists():
                try:
                    self.cri.version(timeout=2.0)
                    return
                except CriError as exc:
                    if exc.code == "UNIMPLEMENTED":  # the socket serves but the CRI plugin did not load
                        raise self._fail("containerd's CRI plugin is not loaded") from None
                    last = str(exc)
            time.sleep(0.1)
        raise self._fail(f"containerd CRI not ready after {self.start_timeout}s (last error: {last})")

    def ctr(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ctr", "-a", str(self.socket), "-n", K8S_NS, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise self._fail(f"ctr {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _import_image(self, image: Path) -> None:
        self.ctr("images", "import", "--platform", "linux/amd64", str(image))
        listed = self.ctr("images", "ls", "-q").stdout.split()
        if IMAGE_REF not in listed:
            raise self._fail(f"sandbox image {IMAGE_REF} missing after import (have {listed})")

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            self._cri = CriClient(self.socket, log_root=self.pod_logs, cgroup_parent=CGROUP_PARENT)
        return self._cri

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- pods --------------------------------------------------------------------------------

    def run_pod(self, name: str, namespace: str, uid: str, **kw: Any) -> str:
        """RunPodSandbox and remember the sandbox (and its netns) for cleanup."""
        sandbox_id = self.cri.run_pod_sandbox(name, namespace, uid, **kw)
        self.sandbox_ids.add(sandbox_id)
        self._seen_sandboxes.add(sandbox_id)
        with contextlib.suppress(CriError):
            netns = self.cri.pod_sandbox_status(sandbox_id).netns
            if netns:
                self.netns_paths.add(netns)
        return sandbox_id

    def remove_pod(self, sandbox_id: str) -> None:
        """What kubelet does when a pod goes away: StopPodSandbox, then RemovePodSandbox."""
        self.cri.stop_pod_sandbox(sandbox_id)
        self.cri.remove_pod_sandbox(sandbox_id)
        self.sandbox_ids.discard(sandbox_id)

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every sandbox the runtime knows; return the errors (cleanup goes on)."""
        errors: list[str] = []
        try:
            sandboxes = [s.id for s in self.cri.list_pod_sandboxes()]
        except CriError as exc:
            return [str(exc)]
        self._seen_sandboxes.update(sandboxes)
        for sandbox_id in {*sandboxes, *self.sandbox_ids}:
            with contextlib.suppress(CriError):
                netns = self.cri.pod_sandbox_status(sandbox_id).netns
                if netns:
                    self.netns_paths.add(netns)
            try:
                self.remove_pod(sandbox_id)
            except CriError as exc:
                if exc.code != "NOT_FOUND":  # removed behind our back (directly via CRI): fine
                    errors.append(str(exc))
            self.sandbox_ids.discard(sandbox_id)
        return errors

    # ---- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Best effort and thorough: pods via CRI, containerd, shims, mounts, netns, bridge, cgroups."""
        if self.alive():
            self.remove_all_pods()
        if self._cri is not None:
            self._cri.close()
            self._cri = None
        self._stop_containerd()
        self._kill_leftover_shims()
        for mnt in _mountpoints_under([self.root, self.state]):
            if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        for path in sorted(self.netns_paths):
            if os.path.exists(path):
                subprocess.run(["umount", path], capture_output=True, check=False)
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self.netns_paths.clear()
        self._remove_bridge()
        self._remove_cgroups()
        for sandbox_id in self._seen_sandboxes:
            for cached in LIBCNI_CACHE.glob(f"*-{sandbox_id}-*"):
                cached.unlink(missing_ok=True)
        self.sandbox_ids.clear()
        self._seen_sandboxes.clear()
        if not _mountpoints_under([self.root, self.state]):
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.state, ignore_errors=True)

    def _stop_containerd(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _our_shims(self) -> Iterator[int]:
        """runc shims started by *this* containerd: their command line names our socket."""
        needle = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and needle in argv:
                yield int(entry.name)

    def _kill_leftover_shims(self) -> None:
        """Shims outlive containerd by design; kill ours and the sandbox processes under them."""
        for pid in list(self._our_shims()):
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _remove_bridge(self) -> None:
        if _ip("link", "show", "dev", BRIDGE).returncode != 0:
            return
        out = _ip("-o", "link", "show", "master", BRIDGE).stdout
        for line in out.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            _ip("link", "del", "dev", name)
        _ip("link", "del", "dev", BRIDGE)

    @staticmethod
    def _remove_cgroups() -> None:
        """runc leaves the parent hierarchy (and, after a kill, sandbox cgroups): rmdir bottom-up."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / CGROUP_PARENT.strip("/")
            if not top.is_dir():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for d in [*dirs, top]:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def __enter__(self) -> ContainerdHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
