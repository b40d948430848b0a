"""KServe v2 tensor parsing: JSON and binary data, and errors that name the problem."""

from __future__ import annotations

import json
import struct
from array import array

import pytest

from replica.api.kserve import TensorSpec, infer_response, parse_infer
from replica.api.schemas import parse_completion
from replica.errors import BadRequest

SPEC = TensorSpec(input_size=4, num_classes=2, max_rows=8)


def body(**tensor: object) -> bytes:
    base = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    return json.dumps({"inputs": [base | tensor]}).encode()


def test_json_tensor_parses_nested_or_flat() -> None:
    assert list(parse_infer(body(data=[[1, 2, 3, 4]]), None, SPEC).data) == [1, 2, 3, 4]
    assert parse_infer(body(), None, SPEC).rows == 1


def test_binary_tensor_parses() -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": 32},
                }
            ]
        }
    ).encode()
    tail = struct.pack("<8f", *range(8))
    parsed = parse_infer(head + tail, len(head), SPEC)
    assert parsed.rows == 2
    assert list(parsed.data) == list(range(8))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "INT32"}, "datatype must be FP32"),
        ({"shape": [1, 5]}, r"shape \[1, 5\] does not match \[-1, 4\]"),
        ({"shape": [9, 4]}, "batch dimension must be 1..8"),
        ({"shape": "1x4"}, "shape must be a list"),
        ({"data": [1, 2, 3]}, "data has 3 values, shape needs 4"),
        ({"data": [1, 2, 3, "x"]}, "data must be numbers"),
        ({"name": "pixels"}, "unknown input 'pixels'"),
    ],
)
def test_bad_tensors_are_named(tensor: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_infer(body(**tensor), None, SPEC)


def test_binary_response_has_header_length() -> None:
    inp = parse_infer(body(), None, SPEC)
    data, headers = infer_response("m", inp, array("f", [0.5, 1.5]), 2)
    assert "Inference-Header-Content-Length" not in headers
    assert json.loads(data)["outputs"][0]["data"] == [0.5, 1.5]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"max_tokens": 4}, "prompt: field required"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens: Input should be greater than 0"),
        ({"prompt": "x", "max_tokens": "4"}, "max_tokens: Input should be a valid integer"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "n": 2}, "n: "),
    ],
)
def test_bad_completion_requests_are_named(payload: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_completion(payload)
