"""Regenerate ``fedlora/proto/v1/`` from ``protos/fedlora/v1/*.proto`` with grpcio-tools.

    python -m fedlora.proto.generate            # rewrite the committed generated code
    python -m fedlora.proto.generate --check    # exit 1 if it is stale (what tests/test_protos.py does)

protoc runs with ``protos/`` as the include root (canonical file names, as every other language
uses), then two rewrites make the output importable inside our own ``fedlora`` package (see
:mod:`fedlora.proto`): ``from fedlora.v1 import`` → ``from fedlora.proto.v1 import``, and the same for
the module name handed to protobuf's builder. ``*_pb2_grpc.py`` files of protos without a service
hold only a version check and are not kept.

Regenerate with the grpcio-tools version pinned in pyproject's ``test`` extra: the generated code
records it (``GRPC_GENERATED_VERSION``, ``ValidateProtobufRuntimeVersion``) and refuses an older
grpcio/protobuf runtime. The staleness check ignores those version stamps, so a patch-level
difference in grpcio-tools does not fail it; any change in what the schema generates does.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "fedlora" / "v1"
OUT_DIR = Path(__file__).resolve().parent / "v1"

GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")

_REWRITES = [
    (re.compile(r"^from fedlora\.v1 import ", re.M), "from fedlora.proto.v1 import "),
    (re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')fedlora\.v1\."), r"\1fedlora.proto.v1."),
]
_VERSION_STAMPS = [  # lines that name the generator's version, not the schema
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the Python modules of every ``fedlora/v1/*.proto`` into ``out_dir`` (flat)."""
    try:
        from grpc_tools import protoc  # in the `test` extra only: the runtime needs grpcio and protobuf
    except ImportError:
        raise RuntimeError("regenerating fedlora.v1 needs grpcio-tools: pip install -e '.[test]'") from None

    protos = sorted((proto_root / "fedlora" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"fedlora: no .proto files under {proto_root / 'fedlora' / 'v1'}")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *(str(p.relative_to(proto_root)) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit(f"fedlora: protoc failed on {[p.name for p in protos]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "fedlora" / "v1").iterdir()):
            text = src.read_text()
            if src.name.endswith("_pb2_grpc.py") and "def add_" not in text:
                continue  # no service in this proto: the file would hold only a version check
            for pattern, repl in _REWRITES:
                text = pattern.sub(repl, text)
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def generated_files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for pattern in GENERATED for p in sorted(directory.glob(pattern))}


def without_version_stamps(text: str) -> str:
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def stale_files(committed_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of generated files that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto_root)
        fresh = generated_files(Path(tmp))
    committed = generated_files(committed_dir)
    return sorted(
        name for name in set(fresh) | set(committed)
        if without_version_stamps(fresh.get(name, "")) != without_version_stamps(committed.get(name, ""))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.proto.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if not PROTO_DIR.is_dir():
        raise SystemExit(f"fedlora: {PROTO_DIR} not found; run from a fedlora source checkout")
    if args.check:
        stale = stale_files()
        print(f"stale: {', '.join(stale)}" if stale else "generated code is up to date")
        return 1 if stale else 0
    for path in generated_files(OUT_DIR):
        (OUT_DIR / path).unlink()  # a removed .proto must not leave its modules behind
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
