"""CNI requests as values: environment + stdin in, a validated `CniRequest` (or a `CniError`) out.

This module is pure (no I/O) so that every rule of the CNI spec we honour — which variables each
verb needs, how `CNI_ARGS` splits, which config versions allow which verbs, how a `prevResult` is
re-emitted in another version — can be tested as a table without a runtime. The shim forwards the
raw material; the agent decides here. Error codes follow spec/cni.md §8.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

SUPPORTED_VERSIONS: Final = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION: Final = "1.1.0"
COMMANDS: Final = frozenset({"ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC"})

DEFAULT_AGENT_SOCKET: Final = "/var/run/ambient-cni/plugin.sock"
DEFAULT_EXCLUDE_NAMESPACES: Final = ("kube-system",)
DEFAULT_POD_NAMESPACE: Final = "istio-system"
DEFAULT_POD_NAME_PREFIX: Final = "ambient-cni-node-"
DEFAULT_TIMEOUT_SECONDS: Final = 20.0
STATUS_GATES: Final = ("boot", "always", "never")


class ErrorCode(IntEnum):
    """Well-known CNI error codes (spec §8); 3 (container unknown) is deliberately absent."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    INVALID_NETNS = 8
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51


class CniError(Exception):
    """A failure the runtime sees as CNI error JSON; `code` tells it whether to retry (11)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"CNI error {code}: {msg}" + (f" ({details})" if details else ""))
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> str:
        return json.dumps(self.to_dict(cni_version))


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """Our own keys in the conflist entry (design.md); defaults mirror the shim's."""

    agent_socket: str = DEFAULT_AGENT_SOCKET
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    pod_namespace: str = DEFAULT_POD_NAMESPACE
    pod_name_prefix: str = DEFAULT_POD_NAME_PREFIX
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    status_gate: str = "boot"
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class CniRequest:
    """One validated CNI invocation. Fields absent for a verb stay empty (e.g. `netns` on a late DEL)."""

    command: str
    cni_version: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    infra_container_id: str = ""
    ips: tuple[str, ...] = ()
    valid_attachments: tuple[tuple[str, str], ...] = ()
    settings: PluginSettings = PluginSettings()

    @property
    def is_kubernetes_pod(self) -> bool:
        """Without both pod name and namespace the caller is not a Kubernetes runtime (spec §3)."""
        return bool(self.pod_namespace and self.pod_name)

    @property
    def is_agent_pod(self) -> bool:
        """The agent's own pods must start even when no agent is ready (reboot deadlock, spec §12)."""
        s = self.settings
        return bool(
            self.pod_namespace
            and s.pod_name_prefix
            and self.pod_namespace == s.pod_namespace
            and self.pod_name.startswith(s.pod_name_prefix)
        )

    @property
    def is_excluded_namespace(self) -> bool:
        return bool(self.pod_namespace) and self.pod_namespace in self.settings.exclude_namespaces


# --- parsing -------------------------------------------------------------------------------------

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")

# Which variables each verb needs (spec §2). CNI_PATH is never demanded: we do not use it, and
# rejecting a variable the runtime considers optional breaks DEL.
_REQUIRED_ENV: Final[Mapping[str, tuple[str, ...]]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}

# Verbs that only exist from some config version on (spec §4).
_MIN_VERSION: Final[Mapping[str, str]] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def sniff_version(stdin: bytes) -> str:
    """The config's cniVersion if we support it, else ours: used for VERSION and error JSON."""
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        return CURRENT_VERSION
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else CURRENT_VERSION


def version_info(cni_version: str) -> str:
    return json.dumps({"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def version_reply(stdin: bytes) -> str:
    """VERSION output: echo a supported input version, else 1.1.0 — satisfies spec and reference."""
    return version_info(sniff_version(stdin))


def parse_cni_args(text: str) -> dict[str, str]:
    """Split `K=V;K=V`. Unknown keys are kept (we are pass-through, so IgnoreUnknown is moot);
    empty segments (a trailing `;`) are skipped; a pair without exactly one `=` is an error."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        parts = pair.split("=")
        if len(parts) != 2 or not parts[0]:
            raise CniError(ErrorCode.INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r}", "want KEY=VALUE;...")
        args[parts[0]] = parts[1]
    return args


def parse_del_lenient(env: Mapping[str, str], stdin: bytes) -> CniRequest:
    """What a DEL that failed validation still tells us: the container and the pod, nothing else.

    DEL must always attempt the removal (cni.md §7): a stale config, an odd CNI_ARGS pair or a newer
    runtime's field must not leave a dead pod enrolled (and in every ztunnel snapshot) forever.
    """
    args: dict[str, str] = {}
    for pair in env.get("CNI_ARGS", "").split(";"):
        key, sep, value = pair.partition("=")
        if sep and key and "=" not in value:
            args[key] = value
    return CniRequest(
        command="DEL",
        cni_version=sniff_version(stdin),
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=args,
        pod_namespace=args.get("K8S_POD_NAMESPACE", ""),
        pod_name=args.get("K8S_POD_NAME", ""),
        pod_uid=args.get("K8S_POD_UID", ""),
        infra_container_id=args.get("K8S_POD_INFRA_CONTAINER_ID", ""),
    )


def _command(env: Mapping[str, str]) -> str:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ErrorCode.INVALID_ENV, "CNI_COMMAND is not set", "the runtime must set CNI_COMMAND")
    if command not in COMMANDS:
        raise CniError(
            ErrorCode.INVALID_ENV,
            f"CNI_COMMAND {command!r} is invalid",
            "want one of " + ", ".join(sorted(COMMANDS)),
        )
    return command


def _check_env(command: str, env: Mapping[str, str]) -> None:
    for name in _REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(ErrorCode.INVALID_ENV, f"{name} is not set", f"required for {command}")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            ErrorCode.INVALID_ENV,
            f"CNI_CONTAINERID {container_id!r} is invalid",
            "must start alphanumeric, then letters, digits, '_', '.', '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (
        len(ifname) > 15
        or ifname in (".", "..")
        or any(c in ifname for c in "/:")
        or any(c.isspace() for c in ifname)
    ):
        raise CniError(
            ErrorCode.INVALID_ENV,
            f"CNI_IFNAME {ifname!r} is invalid",
            "at most 15 characters, no '/', ':' or spaces",
        )
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(ErrorCode.INVALID_ENV, f"CNI_NETNS {netns!r} is invalid", "must be an absolute path")


def _decode_config(stdin: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "failed to decode network configuration", str(exc)) from None
    if not isinstance(doc, dict):
        raise CniError(
            ErrorCode.DECODE_FAILURE,
            "failed to decode network configuration",
            f"want a JSON object, got {doc!r:.80}",
        )
    return doc


def _config_version(config: Mapping[str, Any], command: str) -> str:
    version = config.get("cniVersion")
    if version is None:
        raise CniError(ErrorCode.INVALID_CONFIG, "invalid network config: missing cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    minimum = _MIN_VERSION.get(command)
    if minimum and _version_key(version) < _version_key(minimum):
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command}",
            f"needs >= {minimum}",
        )
    return version


def _check_name(config: Mapping[str, Any]) -> None:
    name = config.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.fullmatch(name):
        what = "missing network name" if name is None else f"invalid network name {name!r}"
        raise CniError(ErrorCode.INVALID_CONFIG, what, "name must start alphanumeric, then [A-Za-z0-9_.-]")


def _settings(config: Mapping[str, Any]) -> PluginSettings:
    """Validate our entry's keys strictly (the shim was lenient so that DEL never fails)."""

    def get(key: str, ok: Callable[[Any], bool], want: str, default: Any) -> Any:
        value = config.get(key)
        if value is None:
            return default
        if not ok(value):
            raise CniError(
                ErrorCode.INVALID_CONFIG, f"invalid plugin setting {key}={value!r}", f"want {want}"
            )
        return value

    def is_str(v: Any) -> bool:
        return isinstance(v, str)

    def is_abs(v: Any) -> bool:
        return isinstance(v, str) and v.startswith("/")

    def is_str_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def is_pos(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and v > 0

    return PluginSettings(
        agent_socket=get("agent_socket", is_abs, "an absolute path", DEFAULT_AGENT_SOCKET),
        exclude_namespaces=tuple(
            get("exclude_namespaces", is_str_list, "a list of strings", list(DEFAULT_EXCLUDE_NAMESPACES))
        ),
        pod_namespace=get("pod_namespace", is_str, "a string", DEFAULT_POD_NAMESPACE),
        pod_name_prefix=get("pod_name_prefix", is_str, "a string", DEFAULT_POD_NAME_PREFIX),
        timeout_seconds=float(get("timeout_seconds", is_pos, "a positive number", DEFAULT_TIMEOUT_SECONDS)),
        status_gate=get("status_gate", lambda v: v in STATUS_GATES, " or ".join(STATUS_GATES), "boot"),
        log_level=get("log_level", is_str, "a string", "info"),
    )


def _prev_result(config: Mapping[str, Any]) -> dict[str, Any] | None:
    prev = config.get("prevResult")
    if prev is None:
        return None
    if not isinstance(prev, dict):
        raise CniError(
            ErrorCode.DECODE_FAILURE, "failed to decode prevResult", f"want a JSON object, got {prev!r:.80}"
        )
    return prev


def _valid_attachments(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """GC's list of attachments the runtime still uses; anything else we know of is stale."""
    raw = config.get("cni.dev/valid-attachments") or []
    if not isinstance(raw, list) or not all(
        isinstance(item, dict) and isinstance(item.get("containerID"), str) for item in raw
    ):
        raise CniError(
            ErrorCode.INVALID_CONFIG,
            "invalid cni.dev/valid-attachments",
            "want a list of {containerID, ifname}",
        )
    return tuple((item["containerID"], str(item.get("ifname") or "")) for item in raw)


def parse_request(env: Mapping[str, str], stdin: bytes) -> CniRequest:
    """Validate one invocation; raises `CniError` with the spec's code for the first problem found."""
    command = _command(env)
    if command == "VERSION":
        return CniRequest(command=command, cni_version=sniff_version(stdin))
    config = _decode_config(stdin)
    version = _config_version(config, command)
    _check_name(config)
    settings = _settings(config)
    _check_env(command, env)
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    prev = _prev_result(config)
    return CniRequest(
        command=command,
        cni_version=version,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        path=env.get("CNI_PATH", ""),
        args=args,
        config=config,
        prev_result=prev,
        pod_namespace=args.get("K8S_POD_NAMESPACE", ""),
        pod_name=args.get("K8S_POD_NAME", ""),
        pod_uid=args.get("K8S_POD_UID", ""),
        infra_container_id=args.get("K8S_POD_INFRA_CONTAINER_ID", ""),
        ips=result_ips(prev, version) if prev else (),
        valid_attachments=_valid_attachments(config) if command == "GC" else (),
        settings=settings,
    )


# --- results -------------------------------------------------------------------------------------
# Three shapes: "0.2" (0.1.0, 0.2.0: ip4/ip6 objects), "0.4" (0.3.0-0.4.0: ips with version),
# "1" (1.0.0, 1.1.0). Cross-shape conversion goes through the 0.4 shape, as the reference does.

_SHAPE: Final[Mapping[str, str]] = {
    "0.1.0": "0.2",
    "0.2.0": "0.2",
    "0.3.0": "0.4",
    "0.3.1": "0.4",
    "0.4.0": "0.4",
    "1.0.0": "1",
    "1.1.0": "1",
}


def _interface(cidr_or_ip: Any, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr_or_ip)
    except (ValueError, TypeError):
        raise CniError(ErrorCode.DECODE_FAILURE, f"prevResult: invalid {what} {cidr_or_ip!r}") from None


def _family(cidr_or_ip: Any, what: str) -> int:
    return _interface(cidr_or_ip, what).version


def _source_version(result: Mapping[str, Any], default: str) -> str:
    """A prevResult carries its own version when its producer set one (the reference honours it)."""
    version = result.get("cniVersion")
    if version is None:
        return default
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, f"prevResult has unsupported cniVersion {version!r}")
    return str(version)


def _list(result: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = result.get(key) or []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise CniError(ErrorCode.DECODE_FAILURE, f"prevResult: {key} must be a list of objects")
    return value


def _pick(obj: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: obj[k] for k in keys if k in obj}


def _with_dns(out: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    if result.get("dns"):
        out["dns"] = result["dns"]
    return out


def _legacy_to_04(result: Mapping[str, Any]) -> dict[str, Any]:
    ips: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for key, family in (("ip4", "4"), ("ip6", "6")):
        cfg = result.get(key)
        if not cfg:
            continue
        if not isinstance(cfg, dict) or "ip" not in cfg:
            raise CniError(ErrorCode.DECODE_FAILURE, f"prevResult: {key} must be an object with ip")
        ips.append({"version": family, "address": cfg["ip"], **_pick(cfg, ("gateway",))})
        routes.extend(_pick(r, ("dst", "gw")) for r in _list(cfg, "routes"))
    out: dict[str, Any] = {"ips": ips}
    if routes:
        out["routes"] = routes
    return _with_dns(out, result)


def _modern_to_04(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "interfaces" in result:
        out["interfaces"] = [_pick(i, ("name", "mac", "sandbox")) for i in _list(result, "interfaces")]
    out["ips"] = [
        {**ip, "version": str(_family(ip.get("address"), "address"))} for ip in _list(result, "ips")
    ]
    if "routes" in result:
        out["routes"] = [_pick(r, ("dst", "gw")) for r in _list(result, "routes")]
    return _with_dns(out, result)


def _04_to_modern(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "interfaces" in result:
        out["interfaces"] = _list(result, "interfaces")
    out["ips"] = [{k: v for k, v in ip.items() if k != "version"} for ip in _list(result, "ips")]
    if "routes" in result:
        out["routes"] = _list(result, "routes")
    return _with_dns(out, result)


def _04_to_legacy(result: Mapping[str, Any]) -> dict[str, Any]:
    """Only the first address of each family survives; routes follow their destination's family."""
    by_family: dict[int, dict[str, Any]] = {}
    for ip in _list(result, "ips"):
        family = _family(ip.get("address"), "address")
        if family not in by_family:
            by_family[family] = {"ip": ip["address"], **_pick(ip, ("gateway",))}
    if not by_family:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            "cannot convert result to CNI 0.1.0/0.2.0: no valid IP addresses",
            "use cniVersion >= 0.3.0 in the network configuration",
        )
    for route in _list(result, "routes"):
        cfg = by_family.get(_family(route.get("dst"), "route dst"))
        if cfg is not None:
            cfg.setdefault("routes", []).append(_pick(route, ("dst", "gw")))
    out = {f"ip{family}": by_family[family] for family in (4, 6) if family in by_family}
    return _with_dns(out, result)


_TO_04: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "0.2": _legacy_to_04,
    "0.4": dict,
    "1": _modern_to_04,
}
_FROM_04: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "0.2": _04_to_legacy,
    "0.4": dict,
    "1": _04_to_modern,
}


def convert_result(result: Mapping[str, Any], from_version: str, to_version: str) -> dict[str, Any]:
    """Same shape: the object is kept as is (unknown keys included) with only cniVersion changed."""
    for v in (from_version, to_version):
        if v not in SUPPORTED_VERSIONS:
            raise CniError(
                ErrorCode.INCOMPATIBLE_VERSION, f"cannot convert result: unsupported version {v!r}"
            )
    src, dst = _SHAPE[from_version], _SHAPE[to_version]
    body = dict(result) if src == dst else _FROM_04[dst](_TO_04[src](result))
    body.pop("cniVersion", None)
    return {"cniVersion": to_version, **body}


def emit_result(prev_result: Mapping[str, Any] | None, cni_version: str) -> str:
    """What a pass-through ADD prints: prevResult in the request's version, or an empty result."""
    if not prev_result:
        if cni_version not in SUPPORTED_VERSIONS:
            raise CniError(ErrorCode.INCOMPATIBLE_VERSION, f"unsupported cniVersion {cni_version!r}")
        return json.dumps({"cniVersion": cni_version})
    return json.dumps(convert_result(prev_result, _source_version(prev_result, cni_version), cni_version))


def result_ips(prev_result: Mapping[str, Any], cni_version: str) -> tuple[str, ...]:
    """Pod addresses (no prefix length) from a prevResult, in order, without duplicates."""
    source = _source_version(prev_result, cni_version)
    if _SHAPE[source] == "0.2":
        raw = [cfg.get("ip") for key in ("ip4", "ip6") if isinstance(cfg := prev_result.get(key), dict)]
    else:
        raw = [ip.get("address") for ip in _list(prev_result, "ips")]
    ips: list[str] = []
    for text in raw:
        addr = str(_interface(text, "address").ip)
        if addr not in ips:
            ips.append(addr)
    return tuple(ips)
