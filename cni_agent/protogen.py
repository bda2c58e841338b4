"""Regenerate (``--write``) or verify (``--check``) the committed protobuf code.

Generated modules are committed so that the agent needs no protoc at run time and so that a
reviewer sees wire-format changes in diffs. ``--check`` regenerates into a temporary directory and
fails when the committed copy has drifted from ``proto/`` (wired into ``make proto-check`` and a
unit test). The table ``TARGETS`` lists every schema; add a row for each new ``.proto``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"


@dataclass(frozen=True)
class Target:
    """One schema and the package its generated modules live in."""

    proto: str  # file name inside proto/
    package_dir: str  # output directory, relative to the repository root
    grpc: bool = False  # also generate gRPC service stubs (*_pb2_grpc.py)


TARGETS: tuple[Target, ...] = (
    Target("zds.proto", "cni_agent/zds/_pb"),
    Target("admin.proto", "cni_agent/ops/_pb", grpc=True),
    Target("cri/api.proto", "cni_agent/testing/_cri", grpc=True),
)

INIT_TEXT = '"""Generated protobuf modules (see cni_agent/protogen.py). Do not edit by hand."""\n'


def _active_targets() -> list[Target]:
    """Targets whose schema exists; a row may be added before its .proto lands."""
    return [t for t in TARGETS if (PROTO_DIR / t.proto).is_file()]


def _plugin_path(name: str) -> str | None:
    """Find a protoc plugin next to the running interpreter (the venv) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def _fix_imports(text: str) -> str:
    """protoc emits ``import foo_pb2``; make it relative so the generated package can be imported."""
    text = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.MULTILINE)
    return re.sub(r"^import (\w+_pb2)$", r"from . import \1", text, flags=re.MULTILINE)


def generate(target: Target, out_dir: Path) -> list[Path]:
    """Run protoc for one target into ``out_dir``; return the files written (names only relevant)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev-only dependency: import lazily

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        # proto/<dir>/x.proto: search <dir> first so the modules land flat in the package (x_pb2.py)
        *([f"-I{PROTO_DIR / Path(target.proto).parent}"] if "/" in target.proto else []),
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
    ]
    mypy_plugin = _plugin_path("protoc-gen-mypy")
    if mypy_plugin is not None:
        args += [f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--mypy_out={out_dir}"]
    else:
        args.append(f"--pyi_out={out_dir}")
    if target.grpc:
        args.append(f"--grpc_python_out={out_dir}")
        grpc_plugin = _plugin_path("protoc-gen-mypy_grpc")
        if grpc_plugin is not None:
            args += [f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}", f"--mypy_grpc_out={out_dir}"]
    args.append(str(PROTO_DIR / target.proto))
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed for {target.proto} (exit {rc}); see messages above")
    stem = Path(target.proto).stem
    written = sorted(out_dir.glob(f"{stem}_pb2*"))
    for path in written:
        path.write_text(_fix_imports(path.read_text()))
    init = out_dir / "__init__.py"
    init.write_text(INIT_TEXT)
    return [*written, init]


def write(targets: Sequence[Target]) -> None:
    """Regenerate every target in place."""
    for target in targets:
        out_dir = REPO_ROOT / target.package_dir
        for path in generate(target, out_dir):
            print(f"wrote {path.relative_to(REPO_ROOT)}")


def check(targets: Sequence[Target]) -> list[str]:
    """Return one message per drifted file (empty list = committed code is current)."""
    problems: list[str] = []
    for target in targets:
        committed_dir = REPO_ROOT / target.package_dir
        with tempfile.TemporaryDirectory(prefix="protogen-") as tmp:
            for fresh in generate(target, Path(tmp)):
                committed = committed_dir / fresh.name
                rel = f"{target.package_dir}/{fresh.name}"
                if not committed.is_file():
                    problems.append(f"{rel}: missing (run `make proto`)")
                    continue
                want, have = fresh.read_text(), committed.read_text()
                if want != have:
                    diff = difflib.unified_diff(
                        have.splitlines(keepends=True),
                        want.splitlines(keepends=True),
                        fromfile=f"{rel} (committed)",
                        tofile=f"{rel} (from proto/{target.proto})",
                    )
                    text = "".join(list(diff)[:40])
                    problems.append(f"{rel}: differs from proto/{target.proto} (run `make proto`)\n{text}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cni_agent.protogen", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the committed modules")
    mode.add_argument("--check", action="store_true", help="fail if committed modules are out of date")
    args = parser.parse_args(argv)
    targets = _active_targets()
    if args.write:
        write(targets)
        return 0
    problems = check(targets)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"protogen --check: {len(problems)} generated file(s) out of date", file=sys.stderr)
        return 1
    print(f"protogen --check: {len(targets)} schema(s) up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
