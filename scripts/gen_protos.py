"""Generate the Python gRPC code for protos/modelgrid/v1/*.proto into modelgrid/v1/.

The one codegen command: `python scripts/gen_protos.py` (or `make protos`). The generated
modules are committed and nobody edits them by hand; tests/unit/test_protos_fresh.py fails
when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every proto into out_dir; return the generated files."""
    from grpc_tools import protoc  # a build-time dependency only
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("modelgrid/v1/*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "modelgrid" / "v1"
    (package / "__init__.py").write_text('"""Generated gRPC code for modelgrid.v1. Do not edit: run scripts/gen_protos.py."""\n')
    return sorted(package.glob("*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write modelgrid/v1/ under")
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files in {args.out / 'modelgrid' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
