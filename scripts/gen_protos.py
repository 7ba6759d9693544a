"""Generate the Python gRPC code for protos/modelgrid/v1/*.proto into modelgrid/v1/, and for the KServe
Open Inference Protocol (protos/inference/grpc_predict_v2.proto, package `inference`) into modelgrid/inference/.

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


# The KServe protocol keeps its own package name (`inference`) on the wire, so protoc writes it as a
# top-level `inference` package; it is moved under modelgrid/ (a bare `inference` package could clash
# with other installed distributions) and its one cross-module import rewritten to match.
KSERVE_PROTO = "inference/grpc_predict_v2.proto"


def _protoc(out_dir: Path, protos: list[str]) -> None:
    from grpc_tools import protoc  # a build-time dependency only
    import grpc_tools

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


def _generate_kserve(out_dir: Path) -> Path:
    staging = out_dir / "_protoc_inference"
    staging.mkdir(parents=True, exist_ok=True)
    _protoc(staging, [KSERVE_PROTO])
    package = out_dir / "modelgrid" / "inference"
    package.mkdir(parents=True, exist_ok=True)
    for generated in sorted((staging / "inference").glob("*")):
        text = generated.read_text().replace("from inference import ", "from modelgrid.inference import ")
        (package / generated.name).write_text(text)
        generated.unlink()
    (staging / "inference").rmdir()
    staging.rmdir()
    (package / "__init__.py").write_text(
        '"""Generated gRPC code for the KServe Open Inference Protocol v2 (package inference). '
        'Do not edit: run scripts/gen_protos.py."""\n'
    )
    return package


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every proto into out_dir; return the generated files."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("modelgrid/v1/*.proto"))
    _protoc(out_dir, protos)
    package = out_dir / "modelgrid" / "v1"
    (package / "__init__.py").write_text('"""Generated gRPC code for modelgrid.v1. Do not edit: run scripts/gen_protos.py."""\n')
    kserve = _generate_kserve(out_dir)
    return sorted([*package.glob("*"), *kserve.glob("*")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write modelgrid/v1/ and modelgrid/inference/ under")
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files in {args.out / 'modelgrid' / 'v1'} and {args.out / 'modelgrid' / 'inference'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
