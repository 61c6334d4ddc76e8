"""KServe v2 REST routes: health, server and model metadata, model ready, infer (JSON tensors
and Triton's binary tensor extension)."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cloud.inference.auth import Caller
from cloud.inference.service import InferenceService, Pending
from shared.errors import ServiceUnavailable, TensorError
from shared.tensors import HEADER_LENGTH, InferRequest, decode_request, encode_response

__all__ = ["EXTENSIONS", "SERVER_NAME", "SERVER_VERSION", "router"]

SERVER_NAME = "edgefleet"
SERVER_VERSION = metadata.version("edgefleet")
EXTENSIONS = ["binary_tensor_data"]

_INLINE = 64 * 1024
router = APIRouter(prefix="/v2", tags=["inference"])


async def _service(request: Request) -> InferenceService:
    # async although it awaits nothing: FastAPI runs a plain def dependency in its thread
    # pool, a hop per request on the inference hot path.
    service: InferenceService = request.app.state.inference
    return service


ServiceDep = Annotated[InferenceService, Depends(_service)]


async def _caller(request: Request, service: ServiceDep) -> Caller:
    header = request.headers.get("authorization")
    caller = service.cached_caller(header)
    if caller is not None:
        return caller
    # A cache miss reads SQL: off the event loop.
    return await run_in_threadpool(service.authenticate, header)


CallerDep = Annotated[Caller, Depends(_caller)]


@router.get("")
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "the registry is not reachable"}})
def ready(service: ServiceDep) -> JSONResponse:
    if not service.ready():
        return JSONResponse({"error": "not ready: the registry is not reachable"}, 503)
    return JSONResponse({"ready": True})


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
def model_metadata(
    model: str, service: ServiceDep, _caller: CallerDep, version: str | None = None
) -> dict[str, Any]:
    return service.metadata(service.resolve(model, version))


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
def model_ready(
    model: str, service: ServiceDep, _caller: CallerDep, version: str | None = None
) -> dict[str, Any]:
    info = service.resolve(model, version)
    service.model_ready(info)
    return {"name": info.model, "version": str(info.version), "ready": True}


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdecimal():
        raise TensorError(f"{HEADER_LENGTH} must be a non-negative integer, not {raw[:40]!r}")
    return int(raw)


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(
    model: str,
    request: Request,
    service: ServiceDep,
    caller: CallerDep,
    version: str | None = None,
) -> Response:
    header_length = _header_length(request)
    body = await request.body()
    settings = service.settings

    def decode() -> InferRequest:
        return decode_request(
            body,
            header_length,
            max_elements=settings.inference_max_request_bytes,
            max_rows=settings.inference_max_request_rows,
        )

    def prepare() -> Pending:
        service.admit(caller)
        return service.submit(service.resolve(model, version), decode)

    # Small bodies of a warm, cached version are queued from the loop (a thread pool hop per
    # request costs more than decoding them); anything that may block goes to the pool.
    pending = service.submit_now(caller, model, version, decode) if len(body) <= _INLINE else None
    if pending is None:
        pending = await run_in_threadpool(prepare)
    try:
        outputs = await asyncio.wait_for(
            asyncio.wrap_future(pending.future), service.answer_timeout_s
        )
    except TimeoutError:
        raise ServiceUnavailable("no answer in time; retry", retry_after_s=1) from None
    answer = pending.finish(outputs)
    wanted = pending.request.outputs
    binary: bool | set[str] = (
        {o.name for o in wanted if o.binary} if wanted else pending.request.binary_output
    )
    content, headers = encode_response(answer, binary=binary)
    return Response(content, 200, headers=headers)
