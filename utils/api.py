"""An OpenAI-compatible chat API (POST /v1/chat/completions, GET /v1/models), served beside the Gradio demo.

Requests are rendered with the same chat template as the demo's chat tab and answered by the same Generator, so a
client such as the official `openai` package talks to the adapter exactly as the chat tab does. Errors use OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the status codes OpenAI uses: 400 bad request,
401 missing or wrong key, 413 too large, 415 a body not sent as application/json, 503 (with Retry-After) when the
queue of waiting requests is full.

A POST must say `Content-Type: application/json`: a web page can make a browser send only "simple" requests
(form or text/plain bodies) to another origin without asking it first (a CORS preflight), so this is what keeps a
page the user visits from generating on their local server (docs/serving.md says which CORS the server answers).

Requests are answered by the server's one pool (utils.serving.Engine, shared with the demo's tabs): beyond the
answers being generated they wait in its queue, and a request whose client has gone is dropped from it.
"""

import asyncio
import base64
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from utils.adapters import Served, default_model
from utils.chat import ChatTemplate, parse_messages
from utils.cli import UserError
from utils.generation import Completion, Generator, PromptTooLong, Settings
from utils.serving import Engine, Job, QueueFull

RETRY_AFTER_S = 5  # what a 503 asks a client to wait before trying again


@dataclass(frozen=True)
class ApiSettings:
    """What the API serves and the limits it enforces."""

    # The id /v1/models lists for the one model served: requests may name any model, this one answers. With several
    # (--lora_weights NAME=PATH, utils.adapters) each has its own id and a request's `model` picks one.
    model: str = "alpaca-lora"
    max_tokens: int = 512  # the most new tokens a request may ask for (400 above)
    max_input_tokens: int = 0  # the longest rendered conversation, in tokens (413 above); 0: the model's context
    max_body_bytes: int = 1 << 20  # 413 above


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type, code, param, headers

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": 'Bearer realm="alpaca-lora"'} if self.status == 401 else self.headers
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


class ChatRequest(BaseModel):
    """The request fields that are honoured; others (tools, logprobs, ...) are ignored, as OpenAI ignores unknown ones."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    messages: list
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Union[str, list[str], None] = None  # up to 4 strings; the answer ends before the first one it writes


def authorized(request: Request, credentials: Optional[tuple[str, str]]) -> bool:
    """The demo's --auth user:password: `Authorization: Bearer <password>` (an OpenAI client's api_key; "user:password"
    works too) or HTTP basic auth with the same user and password."""
    if credentials is None:
        return True
    user, password = credentials
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode()
        except ValueError:
            return False
        return hmac.compare_digest(value.encode(), f"{user}:{password}".encode())
    return scheme.lower() == "bearer" and any(
        hmac.compare_digest(value.encode(), key.encode()) for key in (password, f"{user}:{password}"))


def sse(payload) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@dataclass
class Service:
    """What the /v1 routes answer with: the model, its chat template, the demo's default settings, the API's limits,
    the --auth credentials and the shared pool."""

    generator: Generator
    chat: ChatTemplate
    defaults: Settings
    api: ApiSettings
    credentials: Optional[tuple[str, str]]
    engine: Engine
    created: int  # when the server started: /v1/models lists it as the model's creation time


def build_router(generator: Generator, chat: ChatTemplate, defaults: Settings, api: ApiSettings,
                 credentials: Optional[tuple[str, str]], engine: Engine) -> APIRouter:
    """The /v1 routes; `defaults` supplies temperature, top_p and max_tokens when a request leaves them out;
    `engine`: the pool that generates the answers (the demo's, shared with its tabs)."""
    service = Service(generator, chat, defaults, api, credentials, engine, int(time.time()))
    router = APIRouter(prefix="/v1")

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await answer_chat(service, request)

    @router.get("/models")
    async def models(request: Request):
        return list_models(service, request)

    return router


async def answer_chat(service: Service, request: Request):
    """POST /v1/chat/completions: a streamed or whole answer, or the error that says what is wrong."""
    try:
        check_auth(service, request)
        req = await read_request(request, service.api)
        model = pick_model(service, req.model)
        prompt, settings = await run_in_threadpool(prepare, service, req, model.chat)
        job = submit(service.engine, prompt, settings, req.stop, model.adapter)
    except ApiError as err:
        return err.response()
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return JobResponse(job, events(job, model.name, include_usage), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
    try:
        completion = await answered(job, request)
    except Exception as err:
        return ApiError(500, f"generation failed: {err}", "server_error").response()
    if completion is None:  # the client has gone: nobody to answer
        return Response(status_code=499)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": finish_reason(completion)}],
        "usage": usage(completion),
    }


def list_models(service: Service, request: Request):
    """GET /v1/models: the one model this server answers as; with several, the base and each adapter with the base
    as its `parent` (as vLLM lists LoRA adapters)."""
    try:
        check_auth(service, request)
    except ApiError as err:
        return err.response()
    entry = {"object": "model", "created": service.created, "owned_by": "alpaca-lora"}
    served = service.generator.served
    if not served:
        return {"object": "list", "data": [{"id": service.api.model, **entry}]}
    return {"object": "list", "data": [{"id": m.name, **entry, "parent": m.parent} for m in served.values()]}


def pick_model(service: Service, name: str) -> Served:
    """The model a request names. With several served: that one, the first adapter when it names none, OpenAI's 404
    for an unknown one; else the one model, whatever the name (as before several could be served)."""
    served = service.generator.served
    if not served:
        return Served(service.api.model, None, service.generator.prompter, service.chat)
    if not name:
        return default_model(served)
    if name not in served:
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return served[name]


def check_auth(service: Service, request: Request) -> None:
    if not authorized(request, service.credentials):
        raise ApiError(401, "missing or wrong API key: send the --auth password as the Bearer token (api_key)",
                       "invalid_request_error", "invalid_api_key")


async def read_request(request: Request, api: ApiSettings) -> ChatRequest:
    """The body as a ChatRequest, or the 415/413/400 that says what is wrong with it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"send the body as JSON with the header Content-Type: application/json (not "
                            f"{media_type or 'none'})", code="unsupported_media_type")
    body = await read_body(request, api.max_body_bytes)
    try:
        return ChatRequest.model_validate(json.loads(body.decode("utf-8") or "null"))
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not UTF-8: {err}") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read piece by piece: a 413 as soon as it passes `limit` bytes, whether its length was declared
    or not (a chunked body), so that no oversized body is held in memory whole."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def prepare(service: Service, req: ChatRequest, chat: ChatTemplate) -> tuple[str, Settings]:
    """The rendered prompt and the decoding settings, or the 400/413 that explains what is wrong."""
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    try:
        messages = parse_messages(req.messages, "messages")
    except UserError as err:
        raise ApiError(400, str(err), param="messages") from None
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message should be the user's: it is what the model answers", param="messages")
    settings = request_settings(req, service.defaults, service.api)
    prompt = service.generator.render_chat(chat, messages)
    generator = service.generator
    tokens = generator.prompt_tokens(prompt)
    limit = service.api.max_input_tokens or generator.context_length
    if limit and tokens > limit:
        raise ApiError(413, f"the conversation is {tokens} tokens; this server accepts at most {limit}",
                       code="request_too_large", param="messages")
    try:
        generator.check_length(tokens, settings.max_new_tokens)
    except PromptTooLong as err:
        raise ApiError(400, str(err), code="context_length_exceeded", param="messages") from None
    return prompt, settings


def request_settings(req: ChatRequest, defaults: Settings, api: ApiSettings) -> Settings:
    """The request's decoding settings, the demo's defaults where it leaves one out; one beam."""
    asked = [n for n in (req.max_completion_tokens, req.max_tokens) if n is not None]
    max_tokens = asked[0] if asked else min(defaults.max_new_tokens, api.max_tokens)
    if max_tokens > api.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {api.max_tokens}", param="max_tokens")
    try:
        return Settings(
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k, num_beams=1, max_new_tokens=max_tokens,
        ).checked()
    except UserError as err:
        raise ApiError(400, str(err)) from None


def submit(engine: Engine, prompt: str, settings: Settings, stop: Union[str, list[str], None],
           adapter: Optional[str] = None) -> Job:
    """Queue the request in the shared pool; a full queue is a 503 that says when to retry."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:  # ChatRequest has checked that each is a string
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    try:
        return engine.stream(prompt, settings, stop_strings=stops, adapter=adapter)
    except QueueFull as err:
        raise ApiError(503, str(err), "server_error", "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None


async def answered(job: Job, request: Request) -> Optional[Completion]:
    """The finished completion, or None once the client has disconnected (the job is then stopped and dropped)."""
    drained = asyncio.ensure_future(drain(job))
    while not drained.done():
        await asyncio.wait([drained], timeout=0.5)
        if not drained.done() and await request.is_disconnected():
            job.stop()
            await drained
            return None
    return drained.result()


async def drain(job: Job) -> Completion:
    async for _ in job.pieces():
        pass
    return job.completion


class JobResponse(StreamingResponse):
    """A streamed answer that stops its job however the response ends: finished, the client gone before the first
    byte or during the stream (Starlette cancels the body then, or never starts it), or an error."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop()


async def events(job: Job, model: str, include_usage: bool):
    """The answer as OpenAI streams it: one id and `created` for every chunk, `usage` null until a last chunk that
    holds it (with stream_options.include_usage), then [DONE]; an error after the 200 is reported in the stream."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    if include_usage:
        head["usage"] = None

    def chunk(delta: dict, finish: Optional[str] = None) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        started = False
        async for piece in job.pieces():
            piece = piece if started else piece.lstrip()  # as the non-streamed answer, no leading space
            if piece:
                started = True
                yield chunk({"content": piece})
        yield chunk({}, finish_reason(job.completion))
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(job.completion)})
        yield sse("[DONE]")
    except Exception as err:  # the 200 is already sent: report in the stream, as OpenAI does
        yield sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None, "code": None}})


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def finish_reason(completion: Completion) -> str:
    """OpenAI's names: "length" when max_tokens ended it, else "stop" (EOS, a stop string, or stopped early)."""
    return "length" if completion.finish_reason == "length" else "stop"
