"""KServe v2 / Triton REST model routes: metadata, readiness and `infer` for classifier models."""

from __future__ import annotations

from aiohttp import web

from replica.api.kserve import infer_response, model_metadata, parse_infer
from replica.errors import NotReady
from replica.request_body import read_body
from replica.routes.common import binary_header_length, state
from replica.runtime import ClassifierModel

routes = web.RouteTableDef()


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def metadata(request: web.Request) -> web.Response:
    model = state(request).classifier(request.match_info["name"])
    return web.json_response(model_metadata(model.name, model.spec))


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def ready(request: web.Request) -> web.Response:
    current = state(request)
    if not current.ready:
        raise NotReady(f"replica is {current.phase}")
    model = current.require_model(request.match_info["name"])
    return web.json_response({"name": model.name, "ready": True})


async def run_infer(
    request: web.Request, model: ClassifierModel, body: bytes, header_length: int | None
) -> web.Response:
    inp = parse_infer(body, header_length, model.spec)
    logits = await model.batcher.submit(inp.data)
    payload, headers = infer_response(model.name, inp, logits, model.spec.num_classes)
    return web.Response(body=payload, headers=headers)


@routes.post("/v2/models/{name}/infer")
@routes.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    model = state(request).classifier(request.match_info["name"])
    body = await read_body(request)
    return await run_infer(request, model, body, binary_header_length(request, len(body)))
