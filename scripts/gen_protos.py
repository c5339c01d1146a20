"""Regenerate the Python code under protos/ from its .proto files: `python -m scripts.gen_protos`.

The proto files are compiled with the repository root as the include path, so the generated modules import each
other as `protos.llmserve...` and are importable by package-qualified names from an installed tree.
`--check` compares instead of writing and exits 1 when the committed code is stale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every .proto under protos/, sorted so output is deterministic."""
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into out_dir; return the generated files relative to out_dir."""
    from grpc_tools import protoc  # imported here: only this script needs grpcio-tools

    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing in) the committed tree, plus orphans."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = [str(rel) for rel in fresh
                    if not (ROOT / rel).is_file() or (ROOT / rel).read_bytes() != (Path(tmp) / rel).read_bytes()]
    committed = {p.relative_to(ROOT) for p in PROTO_DIR.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
    problems += [f"{rel} (no .proto generates it)" for rel in sorted(committed - set(fresh))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
