"""Write inference_pb2.py and health_pb2.py (with .pyi stubs) from the .proto files beside this module.

The messages are built in a descriptor pool of their own rather than protobuf's default one, so that they live beside
tritonclient's (the same full names, `inference.ModelInferRequest`, from another file) in one process: the default
pool refuses a name that a second file defines again.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("inference", "health")
PACKAGE = "modelship.protos"


def generated() -> dict[str, str]:
    """{file name: text} for every generated file, as this module writes them."""
    from grpc_tools import protoc  # the dev extra's grpcio-tools: never imported when serving

    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}", *(f"{p}.proto" for p in PROTOS)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see above)")
        files = {p.name: p.read_text() for p in sorted(Path(out).iterdir())}
    for name in PROTOS:
        files[f"{name}_pb2.py"] = private_pool(files[f"{name}_pb2.py"], name)
    return files


def private_pool(code: str, name: str) -> str:
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    top = f"_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, '{name}_pb2', _globals)"
    if default not in code or top not in code:
        raise SystemExit(f"protoc's {name}_pb2.py no longer looks as generate.py expects; update private_pool()")
    code = code.replace(default, "POOL = _descriptor_pool.DescriptorPool()  # modelship: a pool of its own\n"
                        "DESCRIPTOR = POOL.AddSerializedFile(")  # fmt: skip
    return code.replace(top, f"_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.{name}_pb2', _globals)")


def main() -> None:
    for name, text in generated().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE.name}/{name}", file=sys.stderr)


if __name__ == "__main__":
    main()
