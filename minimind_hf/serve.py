"""Serve a MiniMind model over an OpenAI-compatible chat API.

    python -m minimind_hf.serve out/sft                                   # http://127.0.0.1:8000/v1
    python -m minimind_hf.serve out/lora_adapter --port 8080               # an adapter dir, merged on load
    python -m minimind_hf.serve out/full_sft_512.pth --tokenizer data/tokenizer --hidden_size 512 --host 0.0.0.0

Endpoints: `POST /v1/chat/completions` (streamed with `"stream": true`, or not), `GET /v1/models`,
`GET /health`. Any model form `minimind_hf.loading` reads is served: an HF directory (dense or MoE), a Llama
export, a PEFT adapter directory, a `.pth` with its sizes. Prompts go through the tokenizer's chat template,
generation stops at `<|im_end|>`, `temperature: 0` is greedy, and the other defaults are MiniMind's chat
(temperature 0.85, top_p 0.85). `tools`, assistant `tool_calls` and `tool` results are rendered by MiniMind's
template; a call the model writes comes back as text in `content` (`<tool_call>...</tool_call>`): transformers
has no response parser for this model type. A request that names another model, has no or malformed `messages`, an
unknown role, a `max_tokens` below 1 or a body that is not a JSON object gets a 4xx error in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and the server carries on.

The chat handling is `transformers serve`'s own (`ChatCompletionHandler`: chat template, generation config
from the request, SSE chunks, usage). `transformers serve DIR` itself cannot load a MiniMind directory: its
`ModelManager` resolves `config.architectures[0]` as an attribute of the `transformers` module, and it knows
neither adapters nor `.pth` files. So the model is loaded here, by the project's loader, and handed to the
handler through a `ModelManager` pinned to it; the routes are a small FastAPI app of ours, because the request
checks above must run before the handler (it answers a missing `messages` or a negative `max_tokens` with a
500, and accepts any role). Requests are served one generation at a time: the handler's `GenerateManager`
runs every `generate` on one inference thread fed by a queue, so concurrent requests wait their turn.
These classes are those of `transformers.cli.serving` (transformers 5.24), which is not a documented API: a
transformers release that moves them breaks this module's imports, and `tests/test_serve.py` says so at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import X_REQUEST_ID, GenerationState
from transformers.utils.import_utils import is_serve_available

from .cli_options import add_model_arguments, load_from_args
from .tokenizer import generation_config

# The roles MiniMind's chat template renders (a "tool" message is a tool's result, shown to the model as user input).
ROLES = ("system", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body, which its clients turn into `BadRequestError`, `NotFoundError`, ..."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class PinnedModelManager(ModelManager):
    """transformers serve's model manager, pinned (`force_model`) to a model that is already loaded.

    A request naming another model is refused by the handler; the served name is kept as given (the base class
    would append `@main` to a name that is not a local path, as it does for Hub ids).
    """

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self._served = (model, tokenizer)
        super().__init__(device=str(model.device), force_model=name)

    def process_model_name(self, model_id: str) -> str:
        return model_id

    def load_model_and_processor(self, model_id_and_revision: str, **kwargs: Any) -> tuple:
        return self._served


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float, low_open: bool = False) -> bool:
    return _is_number(value) and (low < value if low_open else low <= value) and value <= high


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict):
        return "is not an object"
    if message.get("role") not in ROLES:
        return f"has role {message.get('role')!r}; this model takes {', '.join(map(repr, ROLES))}"
    content = message.get("content")
    if message["role"] == "assistant" and message.get("tool_calls") is not None:
        if not isinstance(message["tool_calls"], list):
            return "tool_calls must be a list"
        if content is None:
            return None
    if isinstance(content, str):
        return None
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return None
    return "content must be a string or a list of text parts"


def check_chat_request(body: Any, served_name: str) -> None:
    """Raise `RequestError` for a chat completion request this server cannot answer as asked."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
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
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not (_is_int(body[key]) and body[key] >= 1):
            raise RequestError(400, f"{key!r} must be an integer of at least 1, got {body[key]!r}", key)
    ranges = {"temperature": ("[", 0.0, 2.0), "top_p": ("(", 0.0, 1.0), "frequency_penalty": ("[", -2.0, 2.0)}
    for key, (bracket, low, high) in ranges.items():
        value = body.get(key)
        if value is not None and not _in_range(value, low, high, low_open=bracket == "("):
            raise RequestError(400, f"{key!r} must be a number in {bracket}{low:g}, {high:g}], got {value!r}", key)
    # Fields the handler takes as they come: a wrong type would otherwise fail inside it as a 500.
    types = {"seed": int, "tools": list, "chat_template_kwargs": dict, "logit_bias": dict, "generation_config": str}
    for key, kind in types.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise RequestError(400, f"{key!r} must be of type {kind.__name__}, got {value!r}", key)
    if body.get("generation_config") is not None:
        try:
            GenerationConfig(**json.loads(body["generation_config"]))
        except (ValueError, TypeError) as err:
            message = f"'generation_config' must be a JSON object of generation settings ({err})"
            raise RequestError(400, message, "generation_config") from err
    if body.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "n")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of strings", "stop")


def build_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> FastAPI:
    """The FastAPI app serving `model` under `name`; it sets the model's generation config (see the module doc)."""
    if not is_serve_available():
        raise ImportError("serving needs fastapi, uvicorn, pydantic and openai: pip install 'transformers[serving]'")
    # The same defaults for every form (a .pth or an adapter brings none): stop at <|im_end|>, sample as chat does.
    model.generation_config = generation_config(tokenizer)
    manager = PinnedModelManager(name, model, tokenizer)
    handler = ChatCompletionHandler(model_manager=manager, generation_state=GenerationState())
    app = FastAPI(title="minimind-hf")

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        # The handler's own refusals (e.g. fields outside the OpenAI schema) and unknown routes, in OpenAI's shape.
        return error_response(err.status_code, str(err.detail))

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
        check_chat_request(body, name)
        request_id = request.headers.get(X_REQUEST_ID) or f"chatcmpl-{uuid.uuid4().hex}"
        return await handler.handle_request(body, request_id)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minimind-hf"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name}

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
    parser.add_argument("--log_level", default="info", help="uvicorn's log level")
    argv = list(sys.argv[1:] if argv is None else argv)
    # MODEL comes first, as in `transformers serve MODEL`; the shared model options spell it --model.
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    args = parser.parse_args(argv)

    model, tokenizer = load_from_args(args, parser)
    app = build_app(model, tokenizer, args.served_model_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
