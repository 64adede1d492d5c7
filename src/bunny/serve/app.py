"""The OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/models`, `/health`, and
the web demo at `/`.

The event loop only parses, checks and streams; the model runs on the scheduler's worker
thread (`bunny.serve.batching`), where each request joins the running batch at the next
decode step. Every bad
request is answered with OpenAI's error shape and the right status; nothing a client sends
can stop the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings
from bunny.serve.batching import BatchScheduler, Event, Job, QueueFull
from bunny.serve.images import ImageLimits, load_image_url
from bunny.serve.limits import BodyLimit, check_api_key
from bunny.serve.schemas import (ApiError, ChatCompletionRequest, chunk_body, completion_body, error_body, new_id,
                                 usage)

log = logging.getLogger("bunny.serve")
DEMO_PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests (not counting the rows being decoded); more -> 503
    max_new_tokens_cap: int = 1024  # a larger max_tokens is refused
    default_max_tokens: int = 256  # when the request gives none (capped by max_new_tokens_cap)
    max_body_bytes: int = 20 * 2**20
    retry_after_s: int = 1
    images: ImageLimits = field(default_factory=ImageLimits)


def create_app(model, processor, settings: ServerSettings, scheduler: BatchScheduler | None = None) -> FastAPI:
    """A FastAPI app serving `model`; the scheduler starts and drains with the app's lifespan."""
    scheduler = scheduler or BatchScheduler(model, processor, settings.max_batch_size, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        # uvicorn runs this after in-flight requests finished (graceful shutdown).
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="bunny", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.settings = scheduler, settings
    _add_error_handlers(app)

    def authorised(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), settings.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "waiting": scheduler.waiting, "active": scheduler.active}

    @app.get("/", response_class=HTMLResponse)
    async def demo_page():
        return HTMLResponse(DEMO_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def list_models():
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorised)])
    async def get_model(model_id: str):
        _check_model(model_id, settings.model_name)
        return _model_card(settings.model_name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatCompletionRequest):
        input_ids, pixel_values, sampling = await prepare(body, model, processor, settings)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(input_ids, pixel_values, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            scheduler.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc}); retry shortly", "server_error", "server_busy",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        cid = new_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, cid, settings.model_name, len(input_ids), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, last = [], None
        try:
            while last is None or last.finish_reason is None:
                last = await events.get()
                pieces.append(last.text)
        finally:
            if last is None or last.finish_reason is None:
                job.cancelled = True  # the client went away
        if last.finish_reason == "error":
            raise ApiError(500, f"generation failed: {last.error}", "server_error", "generation_failed")
        return completion_body(cid, settings.model_name, "".join(pieces).strip(), last.finish_reason,
                               len(input_ids), last.completion_tokens)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


async def prepare(body: ChatCompletionRequest, model, processor, settings: ServerSettings):
    """(prompt token ids, pixel values or None, sampling settings) for a request, or an error."""
    _check_model(body.model, settings.model_name)
    if body.tools:
        raise ApiError(400, "tools are not supported by this server", param="tools")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_new_tokens_cap)
    if max_tokens > settings.max_new_tokens_cap:
        raise ApiError(400, f"max_tokens is {max_tokens}, over this server's cap of {settings.max_new_tokens_cap}",
                       param="max_tokens", code="max_tokens_over_cap")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}", param="stop")

    messages, urls = [], []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None or isinstance(content, str):
            messages.append({"role": role, "content": content or ""})
            continue
        parts = []
        for j, part in enumerate(content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text or ""})
                continue
            if role != "user":
                raise ApiError(400, f"messages[{i}]: images are only accepted in user messages", param="messages")
            url = part.image_url.url if hasattr(part.image_url, "url") else part.image_url
            urls.append((f"messages[{i}].content[{j}]", url))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    limits = settings.images
    if len(urls) > limits.max_images:
        raise ApiError(400, f"the request holds {len(urls)} images, over the limit of {limits.max_images}",
                       param="messages", code="too_many_images")
    if urls and not getattr(model.config, "projector_trained", True):
        raise ApiError(400, "this model's projector is untrained (a plain LLM composed with a tower): it answers "
                            "text only; serve a trained Bunny checkpoint to ask about images",
                       param="messages", code="images_not_supported")
    images = [await load_image_url(url, limits, where) for where, url in urls]

    def tokenize():
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(text=[prompt], images=[images] if images else None)

    inputs = await asyncio.to_thread(tokenize)
    sampling = SamplingSettings(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_strings=stops)
    return inputs["input_ids"][0].tolist(), inputs.get("pixel_values"), sampling


async def _sse(job: Job, events: asyncio.Queue, cid: str, model_name: str, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield data(chunk_body(cid, model_name, created, {"role": "assistant", "content": ""}))
        started = False  # leading whitespace is held back, as the non-streamed answer is stripped
        while True:
            event = await events.get()
            text = event.text if started else event.text.lstrip()
            if text:
                started = True
                yield data(chunk_body(cid, model_name, created, {"content": text}))
            if event.finish_reason is not None:
                break
        finished = True
        if event.finish_reason == "error":
            yield data(error_body(f"generation failed: {event.error}", "server_error", "generation_failed"))
        else:
            yield data(chunk_body(cid, model_name, created, {}, event.finish_reason))
            if include_usage:
                yield data(chunk_body(cid, model_name, created, {}, usage_counts=usage(
                    prompt_tokens, event.completion_tokens), choices=False))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancelled = True  # the client disconnected: free its batch row


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "bunny"}


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist on this server; it serves {served!r}",
                       param="model", code="model_not_found")


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return reply(exc.status, exc.body(), exc.headers)

    @app.exception_handler(BunnyError)
    async def bad_input(request, exc: BunnyError):
        return reply(400, error_body(str(exc), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        param = ".".join(str(p) for p in exc.errors()[0].get("loc", ())[1:]) if exc.errors() else None
        return reply(400, error_body("invalid request: " + "; ".join(problems), "invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(exc.status_code, error_body(str(exc.detail), kind), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unexpected error")
        return reply(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))
