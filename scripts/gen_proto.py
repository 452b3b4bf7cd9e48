"""Regenerate everything derived from proto/: Python modules and Envoy's descriptor set.

One command (`make proto`, or `python scripts/gen_proto.py`) writes gen/; `--check` regenerates
into a temporary folder and fails when the committed gen/ differs, so stale code cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
THIRD_PARTY = ROOT / "third_party"
GEN = ROOT / "gen"
DESCRIPTOR = "sluice.binpb"


def _buf() -> str:
    venv_buf = Path(sys.executable).parent / "buf"
    return str(venv_buf) if venv_buf.exists() else "buf"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    py_out = out / "python"
    py_out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_DIR}", f"-I{THIRD_PARTY}",
            f"--python_out={py_out}", f"--pyi_out={py_out}", f"--grpc_python_out={py_out}",
            *protos,
        ],
        check=True,
        cwd=PROTO_DIR,
    )
    for pkg in {p.parent for p in py_out.rglob("*_pb2.py")} | {py_out / "sluice"}:
        while pkg != py_out:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    # The descriptor set Envoy's transcoder loads: our files plus every import, source info on.
    subprocess.run(
        [_buf(), "build", "--as-file-descriptor-set", "-o", str(out / DESCRIPTOR)],
        check=True,
        cwd=ROOT,
    )


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only in committed gen/: {n}" for n in cmp.left_only]
    out += [f"missing from gen/: {n}" for n in cmp.right_only]
    out += [f"stale: {n}" for n in cmp.diff_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += [f"stale: {n}" for n in mismatch + errors if f"stale: {n}" not in out]
    for sub in cmp.common_dirs:
        out += [f"{sub}/{d}" for d in _differences(a / sub, b / sub)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is not fresh")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(GEN, ignore_errors=True)
        generate(GEN)
        print(f"generated {GEN.relative_to(ROOT)}/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        diffs = _differences(GEN, fresh) if GEN.exists() else ["gen/ is missing"]
    if diffs:
        print("gen/ is stale; run `make proto` and commit the result:", *diffs, sep="\n  ")
        return 1
    print("gen/ is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
