"""The OpenAI-compatible endpoint on an engine (``llm flash-moe serve NAME --http [HOST:]PORT``): ``/v1/models``
and ``/v1/chat/completions`` (streamed or not, tools, ``response_format`` with a JSON schema decoded under
it as ``--schema`` is, usage; images as ``image_url`` parts holding ``data:`` URIs), on starlette + uvicorn
(the ``serve`` extra).

A chat request becomes the same ``generate`` request an llm command sends (OpenAI messages as llm
Messages), queued behind the others on the engine's one generation thread; a client that disconnects
stops its generation. Reasoning is streamed as ``reasoning_content``, as mlx-lm's and vLLM's servers do.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Optional, Tuple

from ..errors import FlashMoeError

OPTION_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed")


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_address(spec: str) -> Tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host is 127.0.0.1 unless given."""
    host, _, port = str(spec).rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise FlashMoeError(f"--http {spec!r}: give [HOST:]PORT, e.g. 8000 or 0.0.0.0:8000") from None
    if not 0 < number < 65536:
        raise FlashMoeError(f"--http {spec!r}: the port must be between 1 and 65535")
    return host.strip("[]") or "127.0.0.1", number


def _text(content, images: Optional[list] = None) -> str:
    """A message's text; its ``image_url`` parts go to ``images`` (user messages), refused elsewhere."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url" and images is not None:
                images.append({"type": "attachment", "attachment": image_attachment(part.get("image_url"))})
            else:
                raise RequestError(400, "only text content parts (and image_url parts in user messages) are supported")
        return "".join(texts)
    raise RequestError(400, "message content must be a string or a list of content parts")


def image_attachment(image_url) -> dict:
    """An OpenAI ``image_url`` whose url is a ``data:image/...;base64,...`` URI, as the engine's request
    carries an image (``images.CarriedImage.to_wire``). The engine does not fetch the web."""
    from ..plugin import images

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise RequestError(400, "image_url.url must be a data:image/...;base64,... URI")
    if url[:8].lower().startswith(("http://", "https://")):
        raise RequestError(400, "image_url: this endpoint does not fetch images from the web; send the image itself "
                                "as a data:image/png;base64,... URI")
    header, comma, data = url.partition(",")
    media = header[len("data:"):].split(";")
    if not header.lower().startswith("data:") or not comma or media[-1].lower() != "base64":
        raise RequestError(400, "image_url.url must be a data:image/...;base64,... URI")
    if media[0].lower() not in images.IMAGE_TYPES:
        raise RequestError(400, f"image_url: {media[0] or 'no media type'} is not an image type this model reads "
                                f"({', '.join(sorted(images.IMAGE_TYPES))})")
    if len(data) > images.base64_chars(images.MAX_IMAGE_BYTES):
        raise RequestError(413, f"image_url: {images.too_large(len(data) * 3 // 4)}")
    if images.CarriedImage.from_wire({"content": data}).error is not None:  # what the engine will decode it with
        raise RequestError(400, "image_url: the data URI's content is not valid base64")
    return {"type": media[0].lower(), "path": None, "url": None, "content": data}


def llm_messages(messages) -> list:
    """OpenAI chat messages -> llm Message dicts (``Message.from_dict``'s format)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    names = {}  # tool_call_id -> function name, for the tool results
    out = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer", "user"):
            images = [] if role == "user" else None
            text = {"type": "text", "text": _text(message.get("content"), images)}
            out.append({"role": "system" if role == "developer" else role, "parts": (images or []) + [text]})
        elif role == "assistant":
            parts = []
            if message.get("reasoning_content"):
                parts.append({"type": "reasoning", "text": str(message["reasoning_content"])})
            if _text(message.get("content")):
                parts.append({"type": "text", "text": _text(message.get("content"))})
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    raise RequestError(400, f"tool call {call.get('id')}: arguments are not JSON") from None
                names[call.get("id")] = function.get("name")
                parts.append({"type": "tool_call", "name": function.get("name"), "arguments": arguments,
                              "tool_call_id": call.get("id")})
            out.append({"role": "assistant", "parts": parts})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            out.append({"role": "tool", "parts": [{"type": "tool_result", "name": names.get(call_id) or "tool",
                                                    "output": _text(message.get("content")),
                                                    "tool_call_id": call_id}]})
        else:
            raise RequestError(400, f"unsupported message role {role!r}")
    return out


def generate_request(engine, body: dict) -> dict:
    """A chat completion request as the engine's ``generate`` request."""
    if body.get("model") not in (engine.name, engine.model.model_id):
        raise RequestError(404, f"model {body.get('model')!r} is not served here; this endpoint serves "
                                f"{engine.model.model_id}", "model_not_found")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "n: one choice per request only")
    if body.get("stop"):
        raise RequestError(400, "stop sequences are not supported")
    options = {key: body[key] for key in OPTION_KEYS if body.get(key) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    if thinking is not None:
        options["thinking"] = bool(thinking)
    try:
        engine.model.Options(**options)
    except ValueError as e:  # pydantic's ValidationError
        raise RequestError(400, " ".join(str(e).split())) from None
    tools = []
    if body.get("tool_choice") != "none":
        for tool in body.get("tools") or []:
            function = tool.get("function") or {}
            tools.append({"name": function.get("name"), "description": function.get("description"),
                          "input_schema": function.get("parameters") or {"type": "object", "properties": {}}})
    schema = None
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise RequestError(400, "response_format.json_schema.schema must be a JSON schema object")
    elif response_format.get("type") == "json_object":
        schema = {"type": "object"}
    return {"type": "generate", "model": engine.name, "messages": llm_messages(body.get("messages")),
            "tools": tools, "schema": schema, "options": options, "conversation_id": None, "keep_alive": None}


def make_app(engine):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status_code=status)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": engine.model.model_id, "object": "model",
                                                         "created": int(engine.started), "owned_by": "llm-flash-moe"}]})

    async def chat_completions(request):
        try:
            body = json.loads(await read_body(request))
            if not isinstance(body, dict):
                raise RequestError(400, "the body must be a JSON object")
            generate = generate_request(engine, body)
        except RequestError as e:
            return error(e.status, str(e), e.kind)
        except ValueError:
            return error(400, "the body is not JSON")
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue = asyncio.Queue()
        job = engine.submit(generate, lambda m: loop.call_soon_threadsafe(messages.put_nowait, m))
        reply = Reply(engine.model.model_id)
        if body.get("stream"):
            usage_chunk = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(job, messages, reply, usage_chunk), media_type="text/event-stream")
        try:
            while True:
                message = await messages.get()
                reply.feed(message)
                if message["type"] == "error":
                    return error(400, message["message"])
                if message["type"] == "done":
                    return JSONResponse(reply.completion())
        finally:
            job.stop.set()

    async def stream(job, messages, reply, usage_chunk: bool):
        try:
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                message = await messages.get()
                delta = reply.feed(message)
                if delta:
                    yield sse(reply.chunk(delta))
                if message["type"] == "error":
                    yield sse({"error": {"message": message["message"], "type": "server_error"}})
                    break
                if message["type"] == "done":
                    yield sse(reply.chunk({}, reply.finish_reason()))
                    if usage_chunk:
                        yield sse(dict(reply.chunk({}), choices=[], usage=reply.usage()))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the task is cancelled): stop at the next token
            job.stop.set()

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat_completions,
                                                                  methods=["POST"])])


async def read_body(request) -> bytes:
    """The request's body, at most what one engine request may carry (protocol.MAX_MESSAGE_BYTES)."""
    from .protocol import MAX_MESSAGE_BYTES

    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MESSAGE_BYTES:
            raise RequestError(413, f"the request is more than {MAX_MESSAGE_BYTES / 2**20:.0f} MiB")
    return bytes(body)


def sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Reply:
    """The engine's messages for one request, as OpenAI chat completion chunks and a final completion."""

    def __init__(self, model_id: str):
        self.model_id, self.id, self.created = model_id, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.text, self.reasoning, self.calls = [], [], []
        self.counts = {"input": 0, "output": 0}
        self.finish: Optional[str] = None

    def feed(self, message: dict) -> Optional[dict]:
        """The delta ``message`` adds to the answer, if any."""
        kind = message["type"]
        if kind == "event" and message["kind"] in ("text", "reasoning"):
            (self.text if message["kind"] == "text" else self.reasoning).append(message["chunk"])
            return {"content" if message["kind"] == "text" else "reasoning_content": message["chunk"]}
        if kind == "tool_call":
            call = {"id": message["tool_call_id"], "type": "function",
                    "function": {"name": message["name"], "arguments": json.dumps(message["arguments"])}}
            self.calls.append(call)
            return {"tool_calls": [dict(call, index=len(self.calls) - 1)]}
        if kind == "usage":
            self.counts = {"input": message["input"], "output": message["output"]}
            self.finish = (message.get("response_json") or {}).get("finish_reason")
        return None

    def finish_reason(self) -> str:
        if self.calls:
            return "tool_calls"
        return "length" if self.finish == "length" else "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": self.counts["input"], "completion_tokens": self.counts["output"],
                "total_tokens": self.counts["input"] + self.counts["output"]}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def completion(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.text) or (None if self.calls else "")}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason()}],
                "usage": self.usage()}


def serve_http(engine, address: str) -> None:
    """Serve ``engine`` over HTTP until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise FlashMoeError("--http needs starlette and uvicorn: pip install 'llm-flash-moe[serve]' "
                            "(or `llm install starlette uvicorn`)") from None
    host, port = parse_address(address)
    print(f"OpenAI-compatible API: http://{host}:{port}/v1 (model {engine.model.model_id})", flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(engine), host=host, port=port, log_level="info"))

    def follow_engine() -> None:  # `llm flash-moe stop` ends the engine: the endpoint goes with it
        engine.stopping.wait()
        server.should_exit = True

    threading.Thread(target=follow_engine, daemon=True).start()
    server.run()
