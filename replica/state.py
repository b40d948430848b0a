"""The replica's lifecycle state (loading -> ready -> draining) and its in-flight count.

One owner: the server creates it; handlers read it through `require_*`; the CLI drives draining.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from replica.batching import Load
from replica.errors import BadRequest, ModelNotFound, NotReady
from replica.runtime import ClassifierModel, GenerativeModel, Runtime, ServedModel

Phase = Literal["loading", "ready", "draining", "failed"]


class ReplicaState:
    def __init__(self) -> None:
        self.phase: Phase = "loading"
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.settled = asyncio.Event()  # set once loading has succeeded or failed
        self.inflight = 0  # every HTTP request being handled (drain waits for these)
        self.working = 0  # POST requests (inference) being handled: the load gateways route by
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def load(self) -> Load:
        return self.runtime.load() if self.runtime else Load(queued=0, running=0, capacity=0)

    def require_runtime(self) -> Runtime:
        if self.phase != "ready" or self.runtime is None:
            raise NotReady(f"replica is {self.phase}; retry on another replica")
        return self.runtime

    def require_model(self, name: str) -> ServedModel:
        model = self.require_runtime().models.get(name)
        if model is None:
            raise ModelNotFound(f"model '{name}' is not served here; see GET /v1/models")
        return model

    def generative(self, name: str | None) -> GenerativeModel:
        if name is None:
            models = self.require_runtime().models.values()
            found = next((m for m in models if isinstance(m, GenerativeModel)), None)
            if found is None:
                raise ModelNotFound("this replica serves no generative model")
            return found
        model = self.require_model(name)
        if not isinstance(model, GenerativeModel):
            raise BadRequest(f"model: '{name}' is a classifier; use POST /v2/models/{name}/infer")
        return model

    def classifier(self, name: str | None) -> ClassifierModel:
        if name is None:
            models = self.require_runtime().models.values()
            found = next((m for m in models if isinstance(m, ClassifierModel)), None)
            if found is None:
                raise ModelNotFound("this replica serves no classifier model")
            return found
        model = self.require_model(name)
        if not isinstance(model, ClassifierModel):
            raise BadRequest(f"model '{name}' is generative; use POST /v1/completions")
        return model

    def begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests (/ping goes 503); wait for in-flight ones. True if all finished."""
        self.phase = "draining"
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
