"""The trainable MLP head as a graph whose tensors are graph inputs, in ONNX and in TFLite.

Inputs: `features` (N, F) and every head tensor by its layout name (`fc0.weight` (out, in), `fc0.bias`, ...);
output `logits`. Zeroth-order agents feed a perturbed head and get the logits in one runtime call, on the
frozen int8 backbone's cached features (the backbone runs once per sample; the head runs per query). The
graphs are checked against `fedfleet.edge_agent.nn.mlp.forward` in the tests.
"""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.nn import mlp


def onnx_head(sizes: list[int]) -> bytes:
    """ONNX (opset 17): Gemm(transB) + Relu per layer, the last without Relu."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", sizes[0]])]
    nodes = []
    cur = "features"
    n = len(sizes) - 1
    for name, shape in mlp.layout(sizes):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    for i in range(n):
        out = "logits" if i == n - 1 else f"h{i}"
        pre = out if i == n - 1 else f"z{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"fc{i}.weight", f"fc{i}.bias"], [pre], transB=1))
        if i < n - 1:
            nodes.append(helper.make_node("Relu", [pre], [out]))
        cur = out
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", sizes[-1]])
    graph = helper.make_graph(nodes, "fedfleet_head", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fedfleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tflite_head(sizes: list[int]) -> bytes:
    """TFLite: FULLY_CONNECTED per layer with its weight and bias as float graph inputs (ReLU fused)."""
    from fedfleet.models.tflite_schema import schema
    from fedfleet.models.tflite_writer import _ACT, _F32, _Builder

    b = _Builder()
    cur = b.tensor("features", (sizes[0],), _F32, batch=True)
    graph_inputs = [cur]
    n = len(sizes) - 1
    for i in range(n):
        w = b.tensor(f"fc{i}.weight", (sizes[i + 1], sizes[i]), _F32)
        bias = b.tensor(f"fc{i}.bias", (sizes[i + 1],), _F32)
        graph_inputs += [w, bias]
        out = b.tensor("logits" if i == n - 1 else f"h{i}", (sizes[i + 1],), _F32, batch=True)
        opt = schema.FullyConnectedOptionsT()
        opt.fusedActivationFunction = _ACT[i < n - 1]
        b.op("FULLY_CONNECTED", [cur, w, bias], [out], False, opt)
        cur = out
    return b.finish(graph_inputs, [cur], "fedfleet head with its tensors as inputs")


def reference(head: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    return mlp.forward(head, features)
