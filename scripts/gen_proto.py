"""Generate the Python code for proto/triphase/api/v1/*.proto into proto/gen/ (committed).

    python scripts/gen_proto.py           # regenerate
    python scripts/gen_proto.py --check   # exit 1 if the committed code differs (byte comparison)
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "proto"
OUT = ROOT / "proto" / "gen"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(SRC.glob("triphase/**/*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in protos:
        args = ["protoc", f"-I{SRC}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(proto)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            sys.stdout.write(f"wrote proto/gen/{path}\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        committed = sorted(p.relative_to(OUT) for p in OUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        stale = [str(p) for p in fresh if not (OUT / p).exists() or not filecmp.cmp(OUT / p, pathlib.Path(tmp) / p,
                                                                                      shallow=False)]
        extra = [str(p) for p in committed if p not in fresh]
    if stale or extra:
        sys.stderr.write(f"proto/gen is stale: differs {stale}, not generated {extra}; run scripts/gen_proto.py\n")
        return 1
    sys.stdout.write("proto/gen is up to date\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
