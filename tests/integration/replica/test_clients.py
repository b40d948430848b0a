"""The clients users already have work against a replica directly: openai and tritonclient."""

from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from openai import AsyncOpenAI

from .conftest import Start


async def test_openai_client_completion_and_stream(start_replica: Start) -> None:
    url = await start_replica()
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        completion = await client.completions.create(
            model="tiny-gpt", prompt="Hello", max_tokens=8, temperature=0
        )
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 8
        assert completion.usage.prompt_tokens == 6  # BOS + 5 bytes
        stream = await client.completions.create(
            model="tiny-gpt", prompt="Hello", max_tokens=8, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
        assert chunks[-1].choices[0].finish_reason == "length"
        models = await client.models.list()
        assert {m.id for m in models.data} == {"tiny-gpt", "classifier"}


async def test_tritonclient_runs_classifier_inference(start_replica: Start) -> None:
    url = await start_replica()
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)

    def run_sync() -> tuple[np.ndarray, np.ndarray]:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert client.is_server_ready()
            assert client.is_model_ready("classifier")
            meta = client.get_model_metadata("classifier")
            assert meta["inputs"][0]["shape"] == [-1, 16]
            binary = triton.InferInput("input", [3, 16], "FP32")
            binary.set_data_from_numpy(x)
            as_json = triton.InferInput("input", [3, 16], "FP32")
            as_json.set_data_from_numpy(x, binary_data=False)
            out = triton.InferRequestedOutput("logits", binary_data=False)
            first = client.infer("classifier", [binary]).as_numpy("logits")
            second = client.infer("classifier", [as_json], outputs=[out]).as_numpy("logits")
            return first, second
        finally:
            client.close()

    first, second = await asyncio.to_thread(run_sync)
    assert first.shape == (3, 4)
    np.testing.assert_allclose(first, second, atol=1e-6)


async def test_tritonclient_aio_reports_bad_shape(start_replica: Start) -> None:
    url = await start_replica()
    async with triton_aio.InferenceServerClient(url.removeprefix("http://")) as client:
        bad = triton_aio.InferInput("input", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
        try:
            await client.infer("classifier", [bad])
        except Exception as error:  # tritonclient raises InferenceServerException
            assert "does not match [-1, 16]" in str(error)
        else:
            raise AssertionError("a wrong shape was accepted")
