"""Serve a MiniMind model over an OpenAI-compatible chat API.

    python -m minimind_hf.serve out/sft                                   # http://127.0.0.1:8000/v1
    python -m minimind_hf.serve out/lora_adapter --port 8080               # an adapter dir, merged on load
    python -m minimind_hf.serve out/full_sft_512.pth --tokenizer data/tokenizer --hidden_size 512 --host 0.0.0.0

Endpoints: `POST /v1/chat/completions` (streamed with `"stream": true`, or not), `GET /v1/models`,
`GET /health`. Any model form `minimind_hf.loading` reads is served. Prompts go through the tokenizer's chat
template (`tools`, assistant `tool_calls` and `tool` results included; `chat_template_kwargs` reach it), generation
stops at `<|im_end|>`, `temperature: 0` is greedy, and the other defaults are MiniMind's chat (temperature 0.85,
top_p 0.85). A reply's `<think>` part comes back as `reasoning_content`, and when tools were offered its
`<tool_call>` blocks come back as OpenAI `tool_calls` (`finish_reason: "tool_calls"`), streamed or not.

Built on documented APIs only: FastAPI for HTTP, `model.generate` with a `BaseStreamer` and a `StoppingCriteria`,
the chat template. (`transformers serve` is not used: it cannot load this model type, and its Python classes are
not a public API; they changed under this module once already.)

Limits, so that no request can hold the server: a prompt longer than the model's context is refused with a 400;
`max_tokens` is cut to what the context has left and to `--max_tokens_limit`; at most `--max_concurrent` requests
generate at once (the others wait their turn, each in its own thread, so a long request does not stop short ones
from being served beside it); a request whose client has gone (disconnected, or gave up on a stream) stops
generating at its next token. A seeded request samples from its own generator, so concurrent requests cannot
change its reply. Anything the server refuses gets a 4xx in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`), and the server carries on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation import BaseStreamer  # the documented base of generate's streamers

from .cli_options import add_model_arguments, load_from_args
from .replies import ReplyStream, drop_partial_character, split_reply
from .tokenizer import EOS_TOKEN

logger = logging.getLogger("minimind_hf.serve")

# The roles the chat templates render (a "tool" message is a tool's result, shown to the model as user input).
ROLES = ("system", "user", "assistant", "tool")
# OpenAI's chat completion request fields. Those not in HONOURED are accepted and ignored (as OpenAI-compatible
# servers do), and any other field is refused with a 422, so that a typo is not silently ignored.
HONOURED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
    "logit_bias", "seed", "stop", "stream", "stream_options", "n", "tools",
}  # fmt: skip
IGNORED = {
    "audio", "function_call", "functions", "logprobs", "metadata", "modalities", "parallel_tool_calls",
    "prediction", "presence_penalty", "reasoning_effort", "response_format", "service_tier", "store",
    "tool_choice", "top_logprobs", "user", "web_search_options",
}  # fmt: skip
# Extensions: `chat_template_kwargs` (e.g. MiniMind-3's `open_thinking`), `top_k`, and `generation_config`, a JSON
# object of generation settings (as `transformers serve` takes it).
EXTENSIONS = {"chat_template_kwargs", "generation_config", "top_k"}
# Generation settings a request's `generation_config` may not set: they are the server's to decide.
SERVER_SETTINGS = {"max_length", "streamer", "stopping_criteria", "logits_processor", "trust_remote_code"}
DEFAULT_MAX_TOKENS = 1024
SEED_RANGE = (0, 2**63 - 1)


class RequestError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body, which its clients turn into `BadRequestError`, `NotFoundError`, ..."""
    return JSONResponse(error_body(status, message, param, code), status)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    return _is_number(value) and (low < value if low_open else low <= value) and value <= high


def _has_lone_surrogate(value: Any) -> bool:
    """JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_lone_surrogate, value))
    return False


def _tool_call_problem(call: Any) -> str | None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        return "each tool call must be an object with a 'function' holding a 'name'"
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return f"the arguments of tool call {function['name']!r} are not valid JSON"
    if not isinstance(arguments, dict):
        return f"the arguments of tool call {function['name']!r} must be a JSON object"
    return None


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict):
        return "is not an object"
    if message.get("role") not in ROLES:
        return f"has role {message.get('role')!r}; this model takes {', '.join(map(repr, ROLES))}"
    content = message.get("content")
    if message["role"] == "assistant" and message.get("tool_calls") is not None:
        if not isinstance(message["tool_calls"], list):
            return "tool_calls must be a list"
        for call in message["tool_calls"]:
            if problem := _tool_call_problem(call):
                return problem
        if content is None:
            return None
    if message["role"] == "assistant" and message.get("reasoning_content") is not None:
        if not isinstance(message["reasoning_content"], str):
            return "reasoning_content must be a string"
    if isinstance(content, str):
        return None
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return None
    return "content must be a string or a list of text parts"


def _tools_problem(tools: list) -> str | None:
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f"tools[{index}] must be an object with a 'function' holding a 'name'"
        if tool.get("type", "function") != "function":
            return f"tools[{index}] has type {tool.get('type')!r}; only 'function' tools are supported"
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            return f"tools[{index}].function.parameters must be a JSON schema object"
    return None


def check_chat_request(body: Any, served_name: str, vocab_size: int | None = None) -> None:
    """Raise `RequestError` for a chat completion request this server cannot answer as asked."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - HONOURED - IGNORED - EXTENSIONS)
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))} in the request", unknown[0])
    model = body.get("model")
    if model is not None and model != served_name:
        message = f"model {model!r} is not served here; this server serves {served_name!r}"
        raise RequestError(404, message, "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of messages", "messages")
    for index, message in enumerate(messages):
        problem = _message_problem(message)
        if problem:
            raise RequestError(400, f"messages[{index}] {problem}", f"messages[{index}]")
    if _has_lone_surrogate(messages) or _has_lone_surrogate(body.get("tools")):
        raise RequestError(400, "the request holds a lone UTF-16 surrogate, which is not text", "messages")
    for key in ("max_tokens", "max_completion_tokens", "top_k"):
        if body.get(key) is not None and not (_is_int(body[key]) and body[key] >= 1):
            raise RequestError(400, f"{key!r} must be an integer of at least 1, got {body[key]!r}", key)
    ranges = {"temperature": ("[", 0.0, 2.0), "top_p": ("(", 0.0, 1.0), "frequency_penalty": ("[", -2.0, 2.0)}
    for key, (bracket, low, high) in ranges.items():
        value = body.get(key)
        if value is not None and not _in_range(value, low, high, low_open=bracket == "("):
            raise RequestError(400, f"{key!r} must be a number in {bracket}{low:g}, {high:g}], got {value!r}", key)
    if body.get("frequency_penalty") is not None and body["frequency_penalty"] <= -1:
        # It becomes repetition_penalty = 1 + frequency_penalty, which must stay positive.
        raise RequestError(400, "'frequency_penalty' must be above -1 for this server", "frequency_penalty")
    types = {"tools": list, "chat_template_kwargs": dict, "logit_bias": dict, "generation_config": str}
    types |= {"stream_options": dict}
    for key, kind in types.items():
        value = body.get(key)
        if value is not None and not isinstance(value, kind):
            raise RequestError(400, f"{key!r} must be of type {kind.__name__}, got {value!r}", key)
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise RequestError(400, f"'seed' must be an integer in [0, 2**63 - 1], got {seed!r}", "seed")
    if body.get("tools") and (problem := _tools_problem(body["tools"])):
        raise RequestError(400, problem, "tools")
    for token, bias in (body.get("logit_bias") or {}).items():
        in_vocab = token.isdigit() and (vocab_size is None or int(token) < vocab_size)
        if not in_vocab or not _in_range(bias, -100, 100):
            message = f"'logit_bias' maps token ids of this model to numbers in [-100, 100]; got {token!r}: {bias!r}"
            raise RequestError(400, message, "logit_bias")
    if body.get("generation_config") is not None:
        _request_generation_config(body["generation_config"])
    if body.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "n")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of non-empty strings", "stop")


def _request_generation_config(text: str) -> dict:
    try:
        settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ValueError("not an object")
        refused = sorted(SERVER_SETTINGS & set(settings))
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be set by a request")
        GenerationConfig(**settings).validate(strict=True)
    except (ValueError, TypeError) as err:
        message = f"'generation_config' must be a JSON object of generation settings ({err})"
        raise RequestError(400, message, "generation_config") from err
    return settings


class _Cancelled(StoppingCriteria):
    """Stops a generation at its next token once its client has gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _SampleWith(LogitsProcessor):
    """Draws the next token from the request's own generator and leaves only it possible.

    `generate` samples from the global RNG, which every concurrent request shares; with this last in the list and
    greedy decoding, a seeded request's reply depends on its seed alone, however many others run beside it.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -float("inf")).scatter(-1, chosen, 0.0)


class _TokenQueue(BaseStreamer):
    """Hands each generated token to the event loop (`generate` calls `put` first with the prompt, skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


@dataclass
class Job:
    """One request's generation: its prompt, settings, and what it produced."""

    input_ids: torch.Tensor
    kwargs: dict
    thinking_open: bool
    tools: bool
    stop: list[str]
    max_new_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None


class Server:
    """The model, its tokenizer, and the rules every request is served by."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_concurrent: int = 4,
        max_tokens_limit: int = 4096,
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.max_tokens_limit = max_tokens_limit
        self.slots = asyncio.Semaphore(max_concurrent)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.generating = 0  # requests generating now (GET /health), so an operator can see abandoned work stop
        self._count_lock = threading.Lock()

    # -- preparing a request --------------------------------------------------------------------------------------
    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the chat template takes them: text parts joined, call arguments parsed from their JSON."""
        rendered = []
        for message in messages:
            message = dict(message)
            if isinstance(message.get("content"), list):
                message["content"] = "".join(part["text"] for part in message["content"])
            if message.get("tool_calls"):
                calls = []
                for call in message["tool_calls"]:
                    function = dict(call["function"])
                    if isinstance(function.get("arguments"), str):
                        function["arguments"] = json.loads(function["arguments"])
                    calls.append({**call, "function": function})
                message["tool_calls"] = calls
            rendered.append(message)
        return rendered

    def prepare(self, body: dict) -> Job:
        """Render, tokenize and bound a checked request (raises `RequestError` for what only now shows)."""
        template_kwargs = dict(body.get("chat_template_kwargs") or {})
        # MiniMind-3's template calls it open_thinking; OpenAI-style clients send enable_thinking.
        if "enable_thinking" in template_kwargs:
            template_kwargs.setdefault("open_thinking", template_kwargs["enable_thinking"])
        try:
            prompt = self.tokenizer.apply_chat_template(
                self._template_messages(body["messages"]),
                tools=body.get("tools") or None,
                add_generation_prompt=True,
                tokenize=False,
                **template_kwargs,
            )
        except (TemplateError, TypeError, ValueError) as err:
            raise RequestError(400, f"the chat template cannot render these messages ({err})", "messages") from err
        input_ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        prompt_tokens = input_ids.shape[1]
        room = self.context - prompt_tokens
        if room < 1:
            message = f"the prompt has {prompt_tokens} tokens; this model takes at most {self.context - 1}"
            raise RequestError(400, message, "messages", "context_length_exceeded")
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        max_new_tokens = min(asked or DEFAULT_MAX_TOKENS, room, self.max_tokens_limit)
        if asked and max_new_tokens < asked:
            logger.info("max_tokens %d cut to %d (context and --max_tokens_limit)", asked, max_new_tokens)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        kwargs = self._generation_kwargs(body, stop)
        thinking_open = prompt.rstrip(" ").endswith("<think>\n")
        return Job(input_ids, kwargs, thinking_open, bool(body.get("tools")), stop, max_new_tokens)

    def _generation_kwargs(self, body: dict, stop: list[str]) -> dict:
        settings = _request_generation_config(body["generation_config"]) if body.get("generation_config") else {}
        temperature = body.get("temperature", settings.pop("temperature", 0.85))
        top_p = body.get("top_p", settings.pop("top_p", 0.85))
        top_k = body.get("top_k", settings.pop("top_k", None))
        greedy = temperature == 0 or settings.pop("do_sample", True) is False
        warpers = LogitsProcessorList()
        if not greedy:
            warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1:
                warpers.append(TopPLogitsWarper(top_p))
            generator = torch.Generator()
            generator.manual_seed(body["seed"] if body.get("seed") is not None else torch.seed())
            warpers.append(_SampleWith(generator))
        kwargs: dict[str, Any] = {**settings, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        kwargs["logits_processor"] = warpers
        if body.get("frequency_penalty"):
            kwargs["repetition_penalty"] = 1.0 + body["frequency_penalty"]
        if body.get("logit_bias"):
            kwargs["sequence_bias"] = {(int(k),): float(v) for k, v in body["logit_bias"].items()}
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        return kwargs

    # -- generating -----------------------------------------------------------------------------------------------
    def _generate(self, job: Job, streamer: _TokenQueue) -> None:
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=job.input_ids.to(self.model.device),
                    attention_mask=torch.ones_like(job.input_ids).to(self.model.device),
                    max_new_tokens=job.max_new_tokens,
                    eos_token_id=self.eos_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]),
                    **job.kwargs,
                )
        except BaseException as err:  # noqa: BLE001 - reported to the request, never kills the server
            job.error = err
            streamer.end()
        finally:
            # The slot is freed when the work has really stopped, not when its request went away.
            with self._count_lock:
                self.generating -= 1
            streamer.loop.call_soon_threadsafe(self.slots.release)

    async def tokens(self, job: Job) -> AsyncIterator[list[int]]:
        """The job's new tokens as they come. When the consumer stops early (its client has gone, or it was
        cancelled), the job is cancelled and its thread stops at the next token."""
        await self.slots.acquire()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = _TokenQueue(asyncio.get_running_loop(), queue)
        with self._count_lock:
            self.generating += 1
        threading.Thread(target=self._generate, args=(job, streamer), daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                job.tokens += item
                yield item
            if job.error is not None:
                raise job.error
        finally:
            # No await here: a cancelled task (anyio cancels at every await) could not get past one.
            job.cancel.set()

    def text(self, job: Job) -> str:
        tokens = [t for t in job.tokens if t != self.eos_id]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in job.stop:  # OpenAI's replies end before the stop sequence
            text = text.split(stop, 1)[0]
        return text

    def finish_reason(self, job: Job, tool_calls: list) -> str:
        if tool_calls:
            return "tool_calls"
        ended = job.tokens and job.tokens[-1] == self.eos_id
        return "length" if len(job.tokens) >= job.max_new_tokens and not ended else "stop"

    def usage(self, job: Job) -> dict:
        prompt, completion = job.input_ids.shape[1], len(job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls(calls: list[dict], request_id: str, with_index: bool = False) -> list[dict]:
    return [
        {
            **({"index": i} if with_index else {}),
            "id": f"call_{request_id[-12:]}_{i}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        }
        for i, call in enumerate(calls)
    ]


async def _complete(server: Server, job: Job, request: Request, request_id: str) -> dict:
    async def watch_client() -> None:
        while not job.cancel.is_set():
            if await request.is_disconnected():
                logger.info("%s: the client has gone; generation stopped", request_id)
                job.cancel.set()
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch_client())
    try:
        async for _ in server.tokens(job):
            pass
    finally:
        watcher.cancel()
    text = server.text(job)
    reply = split_reply(text, job.thinking_open, job.tools)
    finish = server.finish_reason(job, reply.tool_calls)
    content = drop_partial_character(reply.content) if finish == "length" else reply.content
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not reply.tool_calls else None}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = _tool_calls(reply.tool_calls, request_id)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": server.name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": server.usage(job),
    }


async def _stream(server: Server, job: Job, body: dict, request_id: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": server.name}
        return f"data: {json.dumps({**data, 'choices': [choice], **extra}, ensure_ascii=False)}\n\n"

    parts = ReplyStream(job.thinking_open, job.tools)
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for _ in server.tokens(job):
            reasoning, content = parts.feed(server.text(job))
            if reasoning:
                yield chunk({"reasoning_content": reasoning})
            if content:
                yield chunk({"content": content})
    except Exception as err:  # the status line is sent: the error goes into the stream, as OpenAI's does
        logger.exception("%s: generation failed", request_id)
        yield f"data: {json.dumps(error_body(500, f'generation failed: {err}'))}\n\n"
        return
    reasoning, content, calls = parts.finish(server.text(job))
    finish = server.finish_reason(job, calls)
    if finish == "length":
        content = drop_partial_character(content)
    if reasoning:
        yield chunk({"reasoning_content": reasoning})
    if content:
        yield chunk({"content": content})
    if calls:
        yield chunk({"tool_calls": _tool_calls(calls, request_id, with_index=True)})
    yield chunk({}, finish)
    if (body.get("stream_options") or {}).get("include_usage"):
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": server.name}
        yield f"data: {json.dumps({**data, 'choices': [], 'usage': server.usage(job)})}\n\n"
    yield "data: [DONE]\n\n"


def build_app(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    max_concurrent: int = 4,
    max_tokens_limit: int = 4096,
) -> FastAPI:
    """The FastAPI app serving `model` under `name` (see the module doc for its limits)."""
    server = Server(model, tokenizer, name, max_concurrent, max_tokens_limit)
    app = FastAPI(title="minimind-hf")

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))  # unknown routes and methods, in OpenAI's shape

    @app.exception_handler(Exception)
    async def _failed(_request: Request, err: Exception) -> JSONResponse:
        # Starlette still re-raises it after this answer, so uvicorn logs the traceback.
        return error_response(500, f"generation failed: {err}")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the request body is not valid JSON ({err})") from err
        check_chat_request(body, name, server.vocab_size)
        job = await asyncio.to_thread(server.prepare, body)
        request_id = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                _stream(server, job, body, request_id), media_type="text/event-stream", headers=headers
            )
        return JSONResponse(await _complete(server, job, request, request_id))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minimind-hf"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "generating": server.generating}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minimind_hf.serve",
        usage="python -m minimind_hf.serve MODEL [--host H] [--port P] [options]",
        description=__doc__.split("\n")[0],
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", help="the model id clients send (default: MODEL as given)")
    parser.add_argument("--max_concurrent", type=int, default=4, help="requests generating at once; others wait")
    parser.add_argument("--max_tokens_limit", type=int, default=4096, help="the most tokens one reply may have")
    parser.add_argument("--log_level", default="info", help="uvicorn's log level")
    argv = list(sys.argv[1:] if argv is None else argv)
    # MODEL comes first, as in `transformers serve MODEL`; the shared model options spell it --model.
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    args = parser.parse_args(argv)
    for key in ("max_concurrent", "max_tokens_limit"):
        if getattr(args, key) < 1:
            parser.exit(1, f"error: --{key} must be at least 1, got {getattr(args, key)}\n")

    model, tokenizer = load_from_args(args, parser)
    app = build_app(model, tokenizer, args.served_model_name or args.model, args.max_concurrent, args.max_tokens_limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
