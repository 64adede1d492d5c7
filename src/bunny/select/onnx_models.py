"""The two one-node ONNX models that `ort_ops` runs, built with the onnx package's API.

The built files ship in bunny/assets/select/ so that a selection needs onnxruntime only:
importing onnx (with ml_dtypes) takes longer than a small selection. Write them with
`python -m bunny.select.onnx_models`; tests/select/test_int8.py checks that the shipped
files are exactly the models built here and pass onnx's checker.
"""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "select"
KINDS = ("product", "cast")


def build(kind: str):
    """The ModelProto of `kind`:
    "product": Y = MatMulInteger(A uint8 (m, k), B int8 (k, n), a_zero_point = 128), int32;
    "cast": Y = Cast(X float16 (m, d), to = float32)."""
    from onnx import TensorProto, helper

    if kind == "product":
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, ["m", "k"]),
                  helper.make_tensor_value_info("B", TensorProto.INT8, ["k", "n"])]
        output = helper.make_tensor_value_info("Y", TensorProto.INT32, ["m", "n"])
        node = helper.make_node("MatMulInteger", ["A", "B", "azp"], ["Y"])
        init = [helper.make_tensor("azp", TensorProto.UINT8, [], [128])]
    elif kind == "cast":
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["m", "d"])]
        output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", "d"])
        node = helper.make_node("Cast", ["X"], ["Y"], to=TensorProto.FLOAT)
        init = []
    else:
        raise ValueError(f"unknown model {kind!r}: one of {', '.join(KINDS)}")
    graph = helper.make_graph([node], f"bunny_{kind}", inputs, [output], initializer=init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                             producer_name="bunny")


def path(kind: str) -> Path:
    return MODELS_DIR / f"{kind}.onnx"


def write() -> None:
    import onnx

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        model = build(kind)
        onnx.checker.check_model(model)
        onnx.save(model, path(kind))


if __name__ == "__main__":
    write()
