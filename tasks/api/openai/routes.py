"""The ``/v1`` endpoints: OpenAI's models, embeddings, chat completions and completions, served by fleet jobs.

Each request: the key is checked (401/403), its limits counted (429), the body read within its bound (413) and
validated (400), then its job is sent through the fleet's router and awaited (:mod:`.gateway`). Responses carry
the job's id and worker in ``x-gpufleet-job-id`` / ``x-gpufleet-worker`` / ``x-gpufleet-queue`` headers and, in
the body, a ``gpufleet`` extension field (worker, device, queue, timings) that OpenAI's clients ignore.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gpufleet.gpu.errors import GpuError
from gpufleet.gpu.plan.specs import load_spec
from gpufleet.gpu.repository import list_models
from gpufleet.tasks.api.openai.coalescing import EmbedCoalescer
from gpufleet.tasks.api.openai.errors import SERVER, UNAVAILABLE, OpenAIError, from_fleet_error, invalid
from gpufleet.tasks.api.openai.gateway import ClientGone, Finished, JobGateway
from gpufleet.tasks.api.openai.keys import Caller, KeyRing
from gpufleet.tasks.api.openai.schema import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse,
)
from gpufleet.tasks.api.openai.usage import Usage
from gpufleet.tasks.errors import FleetError, JobError
from gpufleet.tasks.fleet import FleetSnapshot
from gpufleet.tasks.names import TaskName
from gpufleet.tasks.planning import plan_target
from gpufleet.tasks.settings import Settings
from gpufleet.tasks.streams import StreamDelta

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # what the usage counters record for a client that left before its answer (nginx's code)
Handler = Callable[[Caller, dict[str, Any], Request, contextlib.ExitStack], Awaitable[Response]]


@functools.lru_cache(maxsize=256)
def _context_of(target: Path) -> int | None:
    """The planner's reading of a model directory's context length (once per directory: requests ask it often)."""
    try:
        return load_spec(target).max_position_embeddings
    except GpuError:
        return None


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json", headers=headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _extension(finished: Finished) -> dict[str, Any]:
    result = finished.result
    return {
        "job_id": finished.job_id,
        "worker": result.get("worker"),
        "device": result.get("device"),
        "gpu_type": result.get("gpu_type"),
        "queue": finished.queue,
        "timings": result.get("timings"),
    }


def _headers(job_ids: list[str], queue: str | None, worker: str | None = None) -> dict[str, str]:
    headers = {"x-gpufleet-job-id": ",".join(job_ids)}
    if queue:
        headers["x-gpufleet-queue"] = queue
    if worker:
        headers["x-gpufleet-worker"] = worker
    return headers


def unpack_base64(packed: str) -> list[float]:
    """A vector in OpenAI's ``encoding_format=base64`` (float32, little-endian, base64) as a list of floats."""
    raw = base64.b64decode(packed)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


class OpenAIFrontDoor:
    """The ``/v1`` router over a job gateway.

    Args:
        gateway: sends and awaits jobs; None when the fleet has no Redis result backend (every request is then
            answered 503 with ``unavailable``).
        keys: the API keys.
        snapshots: reads the live fleet (for the models its workers hold).
        settings: this API's settings: its model root (the models it sees installed) and HF cache.
        max_body_bytes: larger bodies are answered 413.
        default_max_tokens: a chat request's max_tokens when it sets none.
        unavailable: why there is no gateway.
        coalescer: merges concurrent embedding requests into shared jobs; None sends one job a request.
    """

    def __init__(
        self,
        gateway: JobGateway | None,
        keys: KeyRing,
        *,
        snapshots: Callable[[], FleetSnapshot],
        settings: Settings,
        max_body_bytes: int,
        default_max_tokens: int,
        unavailable: str = "",
        coalescer: EmbedCoalescer | None = None,
    ) -> None:
        self.gateway = gateway
        self.keys = keys
        self.snapshots = snapshots
        self.settings = settings
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.unavailable = unavailable
        self.coalescer = coalescer
        self.usage = Usage()

    async def aclose(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()

    # ----------------------------------------------------------------------------------------- the frame

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["openai"])

        @router.get("/models")
        async def models(request: Request) -> Response:
            """The models the fleet can serve: installed under the model root or held by a live worker."""
            return await self._serve(request, "models", self._models, body=False)

        @router.get("/models/{model_id:path}")
        async def model(model_id: str, request: Request) -> Response:
            """One model of ``/v1/models``; 404 when the fleet cannot serve it."""
            return await self._serve(request, "models", functools.partial(self._model, model_id), body=False)

        @router.post("/embeddings")
        async def embeddings(request: Request) -> Response:
            """OpenAI's embeddings: ``input`` a string or a list of strings; float or base64 vectors."""
            return await self._serve(request, "embeddings", self._embeddings)

        @router.post("/chat/completions")
        async def chat_completions(request: Request) -> Response:
            """OpenAI's chat completions, streamed (Server-Sent Events) or not."""
            return await self._serve(request, "chat.completions", self._chat)

        @router.post("/completions")
        async def completions(request: Request) -> Response:
            """OpenAI's (legacy) text completions, streamed or not."""
            return await self._serve(request, "completions", self._completions)

        return router

    async def _serve(self, request: Request, endpoint: str, handler: Handler, *, body: bool = True) -> Response:
        """Authenticate, admit, read the body, run ``handler``; every error as OpenAI's error object."""
        caller_name = "anonymous"
        raw: dict[str, Any] = {}
        stack = contextlib.ExitStack()
        try:
            caller = self.keys.authenticate(request.headers.get("authorization"))
            caller_name = caller.name
            if body:
                raw = await self._body(request)
                model = raw.get("model")
                if isinstance(model, str):
                    self.keys.authorize(caller, model)
            stack.enter_context(self.keys.admit(caller))
            if body and self.gateway is None:
                raise OpenAIError(503, self.unavailable, type=UNAVAILABLE, code="no_result_backend")
            response = await handler(caller, raw, request, stack)
        except OpenAIError as exc:
            response = exc.response()
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)
        except (FleetError, TimeoutError) as exc:
            model = raw.get("model")
            response = from_fleet_error(exc, model=model if isinstance(model, str) else None).response()
        except Exception as exc:  # answer in OpenAI's format; the traceback goes to the log
            log.exception("a /v1/%s request failed", endpoint)
            response = OpenAIError(500, f"the API failed: {exc}; see its log", type=SERVER).response()
        finally:
            # A stream's generator took the stack over (pop_all) and closes it when the stream ends.
            stack.close()
        self.usage.request(caller_name, endpoint, response.status_code)
        return response

    async def _body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
        try:
            raw = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"the request body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(raw, dict):
            raise invalid("the request body must be a JSON object")
        return raw

    def _too_large(self, size: int) -> OpenAIError:
        return OpenAIError(
            413,
            f"the request body has {'at least ' if size else ''}{size} bytes; the limit is {self.max_body_bytes} "
            "(GPUFLEET_API__MAX_BODY_BYTES): send fewer or shorter inputs per request",
            code="request_too_large",
        )

    # ---------------------------------------------------------------------------------------------- models

    async def _model_list(self) -> list[dict[str, Any]]:
        installed: dict[str, float] = {}
        root = self.settings.model_root
        if root is not None:
            for model_id in await anyio.to_thread.run_sync(list_models, root):
                path = root / model_id
                with contextlib.suppress(OSError):
                    installed[model_id] = path.stat().st_mtime
        held: dict[str, list[str]] = {}
        with contextlib.suppress(FleetError):
            snapshot = await anyio.to_thread.run_sync(self.snapshots)
            for worker in snapshot.live():
                for entry in (*worker.resident, *worker.parked):
                    held.setdefault(entry.model, []).append(worker.name)
        now = int(time.time())
        return [
            {
                "id": model_id,
                "object": "model",
                "created": int(installed.get(model_id, now)),
                "owned_by": model_id.split("/", 1)[0] if "/" in model_id else "gpufleet",
                "gpufleet": {"installed": model_id in installed, "held_by": sorted(held.get(model_id, []))},
            }
            for model_id in sorted({*installed, *held})
        ]

    async def _models(self, caller: Caller, raw: dict[str, Any], request: Request, _: Any) -> Response:
        listed = [entry for entry in await self._model_list() if caller.may_use(entry["id"])]
        return _json({"object": "list", "data": listed})

    async def _model(self, model_id: str, caller: Caller, raw: dict[str, Any], request: Request, _: Any) -> Response:
        self.keys.authorize(caller, model_id)
        for entry in await self._model_list():
            if entry["id"] == model_id:
                return _json(entry)
        raise OpenAIError(
            404,
            f"model {model_id!r} is neither installed under the API's model root nor held by a live worker; "
            "GET /v1/models lists those it can serve",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )

    def _context_tokens(self, model: str) -> int | None:
        """The model's context length when this API sees its directory (what the router plans it from)."""
        try:
            target = plan_target(model, self.settings)
        except FleetError:
            return None  # not installed, or a bad id: the job's send says so
        return _context_of(target) if isinstance(target, Path) else None

    def _check_max_tokens(self, model: str, max_tokens: int) -> None:
        context = self._context_tokens(model)
        if context is not None and max_tokens >= context:
            raise invalid(
                f"max_tokens is {max_tokens}, but {model!r} has a context of {context} tokens, prompt included; "
                "ask for fewer",
                "max_tokens",
                "context_length_exceeded",
            )

    # ------------------------------------------------------------------------------------------ embeddings

    async def _embeddings(self, caller: Caller, raw: dict[str, Any], request: Request, _: Any) -> Response:
        body = parse(EmbeddingRequest, raw)
        texts = body.texts()
        assert self.gateway is not None
        # Vectors come from the worker packed (float32, base64: what OpenAI's base64 format is), so a base64
        # request passes them through untouched and a float one unpacks them, with no JSON floats on the way.
        if self.coalescer is not None:
            share = await self.coalescer.embed(body.model, texts, request.is_disconnected)
            finished, vectors, tokens = share.finished, share.vectors, share.tokens
        else:
            job = {"model": body.model, "texts": texts, "normalize": True, "encoding": "base64"}
            finished = await self.gateway.run(TaskName.EMBED, job, request.is_disconnected)
            vectors, tokens = finished.result["embeddings_base64"], int(finished.result.get("prompt_tokens", 0))
        result = finished.result
        encode: Callable[[str], Any] = str if body.encoding_format == "base64" else unpack_base64
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        self.usage.tokens(caller.name, body.model, prompt=tokens)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "gpufleet": _extension(finished),
            },
            _headers([finished.job_id], finished.queue, result.get("worker")),
        )

    # ------------------------------------------------------------------------------------------ generation

    async def _chat(
        self, caller: Caller, raw: dict[str, Any], request: Request, stack: contextlib.ExitStack
    ) -> Response:
        body = parse(ChatCompletionRequest, raw)
        self._check_max_tokens(body.model, body.requested_max_tokens(self.default_max_tokens))
        job = body.job_body(self.default_max_tokens)
        if body.streaming:
            return await self._stream(caller, body.model, job, stack, kind="chat", include_usage=body.include_usage)
        assert self.gateway is not None
        finished = await self.gateway.run(TaskName.GENERATE, job, request.is_disconnected)
        result = finished.result
        usage = self._count(caller, body.model, result)
        return _json(
            {
                "id": f"chatcmpl-{finished.job_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["text"]},
                        "finish_reason": result["finish_reason"],
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                "system_fingerprint": None,
                "gpufleet": _extension(finished),
            },
            _headers([finished.job_id], finished.queue, result.get("worker")),
        )

    async def _completions(
        self, caller: Caller, raw: dict[str, Any], request: Request, stack: contextlib.ExitStack
    ) -> Response:
        body = parse(CompletionRequest, raw)
        prompts = body.prompts()
        self._check_max_tokens(body.model, body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        jobs = [body.job_body(prompt) for prompt in prompts]
        if body.streaming:
            return await self._stream(caller, body.model, jobs[0], stack, kind="text", include_usage=body.include_usage)
        gateway = self.gateway
        assert gateway is not None
        # Every prompt is its own job, sent at once: the workers batch them.
        done = await asyncio.gather(*(gateway.run(TaskName.GENERATE, job, request.is_disconnected) for job in jobs))
        prompt_tokens = sum(int(f.result["prompt_tokens"]) for f in done)
        completion_tokens = sum(int(f.result["completion_tokens"]) for f in done)
        self.usage.tokens(caller.name, body.model, prompt=prompt_tokens, completion=completion_tokens)
        return _json(
            {
                "id": f"cmpl-{done[0].job_id}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {"index": i, "text": f.result["text"], "finish_reason": f.result["finish_reason"], "logprobs": None}
                    for i, f in enumerate(done)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": None,
                "gpufleet": _extension(done[0]) if len(done) == 1 else [_extension(f) for f in done],
            },
            _headers([f.job_id for f in done], done[0].queue, done[0].result.get("worker")),
        )

    def _count(self, caller: Caller, model: str, result: dict[str, Any]) -> dict[str, int]:
        prompt = int(result.get("prompt_tokens", 0))
        completion = int(result.get("completion_tokens", 0))
        self.usage.tokens(caller.name, model, prompt=prompt, completion=completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _stream(
        self,
        caller: Caller,
        model: str,
        job: dict[str, Any],
        stack: contextlib.ExitStack,
        *,
        kind: str,
        include_usage: bool,
    ) -> Response:
        assert self.gateway is not None
        stream = await self.gateway.open_stream(job)
        stack.callback(stream.release)
        owned = stack.pop_all()  # the stream's generator closes it: the key's slot lasts as long as the stream
        prefix, obj = ("chatcmpl", "chat.completion.chunk") if kind == "chat" else ("cmpl", "text_completion")
        chunk_id = f"{prefix}-{stream.job_id}"
        created = int(time.time())

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
            payload: dict[str, Any] = {
                "id": chunk_id,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}],
                **extra,
            }
            if include_usage and "usage" not in payload:
                payload["usage"] = None
            return _sse(payload)

        def piece(text: str, finish_reason: str | None = None) -> dict[str, Any]:
            if kind == "chat":
                return {"delta": {"content": text} if text else {}, "finish_reason": finish_reason}
            return {"text": text, "finish_reason": finish_reason}

        async def events() -> AsyncIterator[str]:
            reader = stream.events()
            try:
                if kind == "chat":
                    yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                result: dict[str, Any] = {}
                async for item in reader:
                    if isinstance(item, StreamDelta):
                        if item.text:
                            yield chunk(piece(item.text))
                    else:
                        result = item
                finished = Finished(stream.job_id, result, stream.queue)
                yield chunk(piece("", result.get("finish_reason", "stop")), gpufleet=_extension(finished))
                usage = self._count(caller, model, result)
                if include_usage:
                    yield chunk(None, usage=usage)
                yield "data: [DONE]\n\n"
            except (JobError, TimeoutError) as exc:
                # The status line has gone: OpenAI's clients raise on an error event.
                yield _sse(from_fleet_error(exc, model=model).body())
            finally:
                with anyio.CancelScope(shield=True):
                    await reader.aclose()
                owned.close()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_headers([stream.job_id], stream.queue)},
        )
