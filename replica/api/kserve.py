"""Open Inference Protocol (KServe v2 / Triton REST) tensors: parse an infer request, build the
response, including Triton's binary tensor extension (`Inference-Header-Content-Length`).
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from replica.api.body import parse_json_object
from replica.errors import BadRequest

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class TensorSpec:
    input_size: int
    num_classes: int
    max_rows: int


@dataclass(frozen=True)
class InferInput:
    rows: int
    data: array[float]
    binary_output: bool
    request_id: str | None


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [x for item in value for x in _flatten(item)]
    return [value]


def _floats_from_json(data: Any, count: int) -> array[float]:
    flat = _flatten(data)
    if len(flat) != count:
        raise BadRequest(f"input '{INPUT_NAME}': data has {len(flat)} values, shape needs {count}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat):
        raise BadRequest(f"input '{INPUT_NAME}': data must be numbers")
    return array("f", flat)


def _floats_from_binary(raw: bytes) -> array[float]:
    out = array("f")
    out.frombytes(raw)
    if sys.byteorder != "little":
        out.byteswap()
    return out


def _check_shape(tensor: dict[str, Any], spec: TensorSpec) -> int:
    shape = tensor.get("shape")
    expected = f"[-1, {spec.input_size}]"
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise BadRequest(f"input '{INPUT_NAME}': shape must be a list of integers like {expected}")
    if len(shape) != 2 or shape[1] != spec.input_size:
        raise BadRequest(f"input '{INPUT_NAME}': shape {shape} does not match {expected}")
    if not 1 <= shape[0] <= spec.max_rows:
        raise BadRequest(f"input '{INPUT_NAME}': batch dimension must be 1..{spec.max_rows}")
    rows: int = shape[0]
    return rows


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    """`owner`'s optional `parameters` object (KServe's per-request, -input and -output flags)."""
    parameters = owner.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}parameters: must be an object")
    return parameters


def _binary_output(body: dict[str, Any]) -> bool:
    outputs = body.get("outputs")
    if outputs is None:
        return bool(_parameters(body, "").get("binary_data_output", False))
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("outputs: must be a list of objects")
    for output in outputs:
        if output.get("name") != OUTPUT_NAME:
            raise BadRequest(
                f"outputs: unknown output {output.get('name')!r}; this model has 'logits'"
            )
    return any(
        bool(_parameters(o, f"outputs[{i}].").get("binary_data", False))
        for i, o in enumerate(outputs)
    )


def parse_infer(body: bytes, header_length: int | None, spec: TensorSpec) -> InferInput:
    head, tail = (
        (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    )
    request = parse_json_object(head)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"inputs: expected a list with one tensor named '{INPUT_NAME}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise BadRequest(
            f"inputs[0].name: unknown input {tensor.get('name')!r}; expected '{INPUT_NAME}'"
        )
    if tensor.get("datatype") != "FP32":
        raise BadRequest(
            f"input '{INPUT_NAME}': datatype must be FP32, got {tensor.get('datatype')!r}"
        )
    rows = _check_shape(tensor, spec)
    count = rows * spec.input_size
    size = _parameters(tensor, "inputs[0].").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * 4 or len(tail) != size:
            raise BadRequest(
                f"input '{INPUT_NAME}': binary_data_size must be {count * 4} and the binary "
                "data that many bytes"
            )
        data = _floats_from_binary(tail)
    else:
        data = _floats_from_json(tensor.get("data"), count)
    if not all(math.isfinite(x) for x in data):
        raise BadRequest(f"input '{INPUT_NAME}': data must be finite numbers")
    request_id = request.get("id")
    return InferInput(rows, data, _binary_output(request), str(request_id) if request_id else None)


def infer_response(
    model: str, inp: InferInput, logits: array[float], num_classes: int
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers (binary output when the request asked for it)."""
    output: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "datatype": "FP32",
        "shape": [inp.rows, num_classes],
    }
    tail = b""
    if inp.binary_output:
        out = array("f", logits)
        if sys.byteorder != "little":
            out.byteswap()
        tail = out.tobytes()
        output["parameters"] = {"binary_data_size": len(tail)}
    else:
        output["data"] = logits.tolist()
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [output]}
    if inp.request_id:
        response["id"] = inp.request_id
    head = json.dumps(response).encode()
    if not inp.binary_output:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + tail, headers


def model_metadata(model: str, spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": model,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, spec.input_size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
    }
