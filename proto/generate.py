"""Generate the Python gRPC code for every .proto under proto/ into vmmd/_proto/.

protoc names imports after the proto file path (`vmmd.v1.vmm_pb2`,
`grpc.health.v1.health_pb2`), which would collide with the `vmmd` and `grpc`
packages themselves; the generated tree is therefore placed under the
package vmmd._proto (mirroring proto/) and its cross-imports rewritten to
it.  Descriptor file names stay `vmmd/v1/vmm.proto` etc., so reflection
shows the same files a client compiles from proto/.  One private package for
all of them: the API uses vmm/health/reflection, the snapshot code uses
snapshot.proto, and neither lives inside the other.
Run by the Makefile (needs grpcio-tools, a dev dependency).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
OUT = ROOT.parent / "vmmd" / "_proto"
PKG = "vmmd._proto"


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    ours = {str(Path(p).parent).replace("/", ".") for p in protos}
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos])
        if rc != 0:
            return rc
        shutil.rmtree(OUT, ignore_errors=True)
        for f in Path(tmp).rglob("*.py*"):
            dest = OUT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = re.sub(r"^from ([\w.]+) import (\w+_pb2)",
                          lambda m: (f"from {PKG}.{m[1]} import {m[2]}" if m[1] in ours else m[0]),
                          f.read_text(), flags=re.M)
            dest.write_text(text)
    for d in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (d / "__init__.py").write_text('"""Generated from proto/ by proto/generate.py."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
