"""SageMaker `POST /invocations`: one entry point, routed by the body's shape.

- a body with `inputs` is a KServe v2 infer request (JSON or binary tensor extension) for the
  classifier named by `model_name` (default: the first classifier served);
- a body with `messages` is an OpenAI chat completion body, and any other JSON object an OpenAI
  completion body (`prompt`, `max_tokens`, `stream`, ...), for the model named by `model`
  (default: the first generative model served).
"""

from __future__ import annotations

from aiohttp import web

from replica.api.body import parse_json_object
from replica.request_body import read_body
from replica.routes import chat, kserve, openai
from replica.routes.common import binary_header_length, state

routes = web.RouteTableDef()


@routes.post("/invocations")
async def invocations(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    header_length = binary_header_length(request, len(body))
    head = parse_json_object(body if header_length is None else body[:header_length])
    if "inputs" in head:
        name = head.get("model_name")
        model = state(request).classifier(name if isinstance(name, str) else None)
        return await kserve.run_infer(request, model, body, header_length)
    if "messages" in head:
        return await chat.chat(request, head)
    return await openai.complete(request, head)
