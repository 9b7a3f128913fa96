"""Serving over the OpenAI API, driven by the `openai` client: `python -m minimind_hf.serve` for every model form,
and `transformers serve` itself for the Llama export of a dense model."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM, MiniMindConfig, MiniMindForCausalLM
from minimind_hf.agent_client import run_with_tools
from minimind_hf.chat import generate_reply
from minimind_hf.convert import main as convert_main
from minimind_hf.convert import save_pth
from minimind_hf.loading import load_model_and_tokenizer
from minimind_hf.serve import build_app, main
from minimind_hf.tokenizer import EOS_TOKEN, load_tokenizer

# Starts servers (a subprocess for `transformers serve`): `make test-all` runs it.
pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
PTH_ARGS = ["--hidden_size", "32", "--num_hidden_layers", "2"]
PTH_ARGS += ["--config_overrides", "num_attention_heads=4,num_key_value_heads=2"]
MAX_TOKENS = 12
QUESTION = [{"role": "user", "content": "A duck goes what?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are MiniMind."},
    {"role": "user", "content": "Is 7 odd or even?"},
    {"role": "assistant", "content": "odd"},
    {"role": "user", "content": "A duck goes what?"},
]
PROMPTS = ["猫会怎么叫？", "Is 12 odd or even?", "Which is bigger, 3 or 8?", "What colour is grass?"]


def tiny_model(seed: int = 0, **config) -> MiniMindForCausalLM:
    """Random weights that are float16 values, so that the model is the same as a .pth (stored in float16)."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**SIZES, **config)).half().float().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One tiny model in every form: HF directory, MoE HF directory, LoRA adapter directory, .pth, Llama export."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("serve_models")
    tokenizer = load_tokenizer(tokenizer_dir)
    paths = {"dense": root / "dense", "moe": root / "moe", "adapter": root / "adapter", "pth": root / "tiny.pth"}
    for name, model in (("dense", tiny_model()), ("moe", tiny_model(1, use_moe=True))):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    save_pth(tiny_model(), paths["pth"])
    base = MiniMindForCausalLM.from_pretrained(paths["dense"])
    # Non-zero LoRA B matrices, so that the merged adapter changes what the model says.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(2)
    get_peft_model(base, lora).save_pretrained(paths["adapter"])
    paths["llama"] = root / "llama"
    convert_main(["hf2llama", str(paths["dense"]), str(paths["llama"]), "--tokenizer", str(tokenizer_dir)])
    return paths


def reference(source: Path, cut_partial_character: bool = True, **sizes):
    """Greedy replies of `source` loaded by the project's loader, computed in-process (what the server must say).

    A reply cut by max_tokens inside a multi-byte character ends with U+FFFD when decoded whole; the server ends it
    at the last whole character instead, streamed or not."""
    model, tokenizer = load_model_and_tokenizer(source, **sizes)
    return lambda messages, max_tokens=MAX_TOKENS: generate_reply(
        model, tokenizer, messages, greedy=True, max_new_tokens=max_tokens
    ).rstrip("\ufffd" if cut_partial_character else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def in_thread(app):
    """Serve `app` with uvicorn on a loopback socket bound before the server starts (no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def in_subprocess(argv: list[str], port: int, log: Path):
    """Run a server command, wait for its /health, and stop it at the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not answer /health:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(api, model: str, messages: list[dict], stream: bool = False, **request) -> str:
    request = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, **request}
    if not stream:
        return api.chat.completions.create(**request).choices[0].message.content
    chunks = list(api.chat.completions.create(stream=True, **request))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def check_chat(url: str, model: str, expected) -> None:
    """Plain, streamed, multi-turn, temperature-0 determinism and concurrent requests, against `expected`."""
    api = client(url)
    answer = expected(QUESTION)
    assert answer.strip(), "the random model should say something"
    completion = api.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert completion.choices[0].message.content == answer
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model == model and 0 < completion.usage.completion_tokens <= MAX_TOKENS
    assert ask(api, model, QUESTION) == answer, "temperature 0 must give the same reply every time"
    assert ask(api, model, QUESTION, stream=True) == answer

    multi_turn = ask(api, model, MULTI_TURN)
    assert multi_turn == expected(MULTI_TURN)
    assert multi_turn != answer, "the earlier turns and the system prompt must reach the model"

    # Several clients at once, streamed and not: each gets the reply to its own conversation.
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(
            pool.map(
                lambda i: ask(api, model, [{"role": "user", "content": PROMPTS[i]}], stream=i % 2 == 1),
                range(len(PROMPTS)),
            )
        )
    assert replies == [expected([{"role": "user", "content": p}]) for p in PROMPTS]
    assert len(set(replies)) > 1


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def dense_server(models):
    model, tokenizer = load_model_and_tokenizer(models["dense"])
    with in_thread(build_app(model, tokenizer, "minimind-tiny")) as url:
        yield url


def test_serves_plain_streamed_multi_turn_and_concurrent_chat(dense_server, models):
    check_chat(dense_server, "minimind-tiny", reference(models["dense"]))


def test_models_and_health(dense_server):
    with urllib.request.urlopen(f"{dense_server}/health") as response:
        assert json.loads(response.read())["status"] == "ok"
    assert [m.id for m in client(dense_server).models.list().data] == ["minimind-tiny"]


GOOD = {"model": "minimind-tiny", "messages": QUESTION, "temperature": 0, "max_tokens": 4}
BAD_REQUESTS = {
    "invalid JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "no messages": (json.dumps({"model": "minimind-tiny"}).encode(), 400, "'messages'"),
    "empty messages": (json.dumps({**GOOD, "messages": []}).encode(), 400, "'messages'"),
    "unknown role": (json.dumps({**GOOD, "messages": [{"role": "bot", "content": "hi"}]}).encode(), 400, "'bot'"),
    "content not text": (json.dumps({**GOOD, "messages": [{"role": "user", "content": 3}]}).encode(), 400, "content"),
    "negative max_tokens": (json.dumps({**GOOD, "max_tokens": -5}).encode(), 400, "max_tokens"),
    "temperature out of range": (json.dumps({**GOOD, "temperature": -1}).encode(), 400, "temperature"),
    "top_p of 0": (json.dumps({**GOOD, "top_p": 0}).encode(), 400, "top_p"),
    "n > 1": (json.dumps({**GOOD, "n": 3}).encode(), 400, "n=1"),
    "tools not a list": (json.dumps({**GOOD, "tools": "get_weather"}).encode(), 400, "tools"),
    "bad generation_config": (
        json.dumps({**GOOD, "generation_config": '{"max_new_tokens": -1}'}).encode(),
        400,
        "generation_config",
    ),
    "unknown model": (json.dumps({**GOOD, "model": "gpt-4"}).encode(), 404, "'gpt-4' is not served"),
    "unknown field": (json.dumps({**GOOD, "colour": "red"}).encode(), 422, "colour"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(dense_server, case):
    body, status, message = BAD_REQUESTS[case]
    code, answer = post(dense_server, body)
    assert code == status
    assert message in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    code, answer = post(dense_server, json.dumps(GOOD).encode())
    assert code == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_the_openai_client_raises_its_own_errors(dense_server):
    api = client(dense_server)
    with pytest.raises(openai.NotFoundError, match="not served"):
        api.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.chat.completions.create(model="minimind-tiny", messages=QUESTION, max_tokens=-1)
    assert ask(api, "minimind-tiny", QUESTION, max_tokens=4) is not None


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Mirenburg?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Mirenburg"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"},
]


def test_tools_and_tool_results_reach_the_chat_template(dense_server, models):
    """MiniMind's template renders tool signatures, tool calls and tool results: the served reply is the greedy
    continuation of exactly that prompt."""
    model, tokenizer = load_model_and_tokenizer(models["dense"])
    # The API sends a call's arguments as a JSON string; the template is given them parsed, as the server does.
    call = TOOL_TURNS[1]["tool_calls"][0]
    parsed_call = {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
    turns = [TOOL_TURNS[0], {**TOOL_TURNS[1], "tool_calls": [parsed_call]}, TOOL_TURNS[2]]
    inputs = tokenizer.apply_chat_template(
        turns, tools=TOOLS, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert "get_weather" in prompt and '"city": "Mirenburg"' in prompt and "sunny, 21 C" in prompt
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        )
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    api = client(dense_server)
    reply = ask(api, "minimind-tiny", TOOL_TURNS, tools=TOOLS)
    assert reply == expected
    assert reply != ask(api, "minimind-tiny", TOOL_TURNS[:1])


@pytest.mark.parametrize("form", ["moe", "adapter"])
def test_moe_and_adapter_models_are_served(models, form):
    model, tokenizer = load_model_and_tokenizer(models[form])
    assert model.config.use_moe == (form == "moe")
    expected = reference(models[form])
    with in_thread(build_app(model, tokenizer, form)) as url:
        api = client(url)
        assert ask(api, form, QUESTION) == expected(QUESTION)
        assert ask(api, form, QUESTION, stream=True) == expected(QUESTION)
    if form == "adapter":
        assert expected(QUESTION) != reference(models["dense"])(QUESTION), "the adapter must be merged in"


def test_command_line_serves_a_pth_with_its_sizes(models, tokenizer_dir, monkeypatch):
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    main([str(models["pth"]), "--tokenizer", str(tokenizer_dir), *PTH_ARGS, "--port", "8123", "--host", "0.0.0.0"])
    assert (started["host"], started["port"]) == ("0.0.0.0", 8123)
    with in_thread(started["app"]) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == [str(models["pth"])]
        # The .pth holds the same float16 weights as the HF directory: the same greedy replies.
        expected = reference(models["dense"])
        assert ask(api, str(models["pth"]), QUESTION, stream=True) == expected(QUESTION)
        assert ask(api, str(models["pth"]), MULTI_TURN) == expected(MULTI_TURN)


def test_command_line_rejects_a_missing_model_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--port", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1


def test_transformers_serve_serves_the_llama_export(models, tmp_path):
    """`transformers serve DIR` on `hf2llama`'s output (with its tokenizer), as a user would run it."""
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    llama = str(models["llama"])
    argv = [str(cli), "serve", llama, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    expected = reference(models["dense"], cut_partial_character=False)  # transformers serve keeps the U+FFFD
    with in_subprocess(argv, port, tmp_path / "transformers_serve.log") as url:
        check_chat(url, llama, expected)
        # transformers serve answers what it refuses with a 4xx too, and carries on.
        code, _ = post(url, json.dumps({**GOOD, "model": "gpt-4"}).encode())
        assert code == 400
        code, _ = post(url, json.dumps({**GOOD, "model": llama, "colour": "red"}).encode())
        assert code == 422
        assert ask(client(url), llama, QUESTION) == expected(QUESTION)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def roomy_server(models):
    """A server that lets one reply run to 30,000 tokens (minutes on this model) and two requests at once."""
    model, tokenizer = load_model_and_tokenizer(models["dense"])
    # The random model would end most replies early: forbid <|im_end|> so that a long request stays long.
    with in_thread(build_app(model, tokenizer, "minimind-tiny", max_concurrent=2, max_tokens_limit=30000)) as url:
        yield url, tokenizer.convert_tokens_to_ids(EOS_TOKEN)


def test_a_huge_request_neither_holds_the_server_nor_runs_on_once_its_client_has_gone(roomy_server):
    url, eos = roomy_server
    long_request = {**GOOD, "max_tokens": 1_000_000, "logit_bias": {str(eos): -100}, "temperature": 0.9}
    # A client that gives up after 2 s on a non-streamed reply, and one that stops reading a stream.
    with pytest.raises(openai.APITimeoutError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=2).chat.completions.create(
            **long_request
        )
    stream = client(url).chat.completions.create(stream=True, **long_request)
    next(iter(stream))
    assert get_json(f"{url}/health")["generating"] >= 1
    # While the abandoned one may still be winding down and the stream is live, a short request is answered.
    started = time.monotonic()
    assert ask(client(url), "minimind-tiny", QUESTION, max_tokens=4) is not None
    short_seconds = time.monotonic() - started
    stream.close()
    assert wait_until(lambda: get_json(f"{url}/health")["generating"] == 0), "abandoned generations must stop"
    print(f"short request answered in {short_seconds:.2f} s beside a 1,000,000-token one")
    assert short_seconds < 30


def test_prompts_beyond_the_context_are_refused_and_max_tokens_is_cut_to_it(models):
    _, tokenizer = load_model_and_tokenizer(models["dense"])
    model = tiny_model(max_position_embeddings=64)
    with in_thread(build_app(model, tokenizer, "short")) as url:
        long_prompt = [{"role": "user", "content": "duck " * 80}]
        code, answer = post(url, json.dumps({"model": "short", "messages": long_prompt}).encode())
        assert code == 400 and answer["error"]["code"] == "context_length_exceeded"
        assert "this model takes at most 63" in answer["error"]["message"]
        completion = client(url).chat.completions.create(
            model="short", messages=QUESTION, max_tokens=1_000_000, temperature=0, logit_bias={"2": -100}
        )
        assert completion.usage.total_tokens <= 64 and completion.choices[0].finish_reason == "length"


def test_a_seeded_request_gives_the_same_reply_however_many_run_beside_it(dense_server):
    api = client(dense_server)
    request = {"model": "minimind-tiny", "messages": QUESTION, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12}
    alone = api.chat.completions.create(seed=7, **request).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        seeds = [7, 8, 7, 9]
        replies = list(pool.map(lambda s: api.chat.completions.create(seed=s, **request), seeds))
    texts = [r.choices[0].message.content for r in replies]
    assert texts[0] == texts[2] == alone
    assert len(set(texts)) > 1, "other seeds sample other replies"


MORE_BAD_REQUESTS = {
    "tool without a name": ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0]"),
    "tool of another type": ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "only 'function'"),
    "logit_bias beyond the vocabulary": ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    "logit_bias not a number": ({"logit_bias": {"5": "high"}}, "logit_bias"),
    "huge seed": ({"seed": 2**70}, "'seed'"),
    "negative seed": ({"seed": -1}, "'seed'"),
    "empty stop string": ({"stop": [""]}, "'stop'"),
    "frequency_penalty at -1": ({"frequency_penalty": -1.0}, "frequency_penalty"),
    "tool call arguments not JSON": (
        {
            "messages": [
                TOOL_TURNS[0],
                {**TOOL_TURNS[1], "tool_calls": [{"function": {"name": "get_weather", "arguments": "{oops"}}]},
            ]
        },
        "not valid JSON",
    ),
    "generation_config sets the streamer": ({"generation_config": '{"streamer": 1}'}, "cannot be set"),
}


@pytest.mark.parametrize("case", MORE_BAD_REQUESTS, ids=list(MORE_BAD_REQUESTS))
def test_more_bad_requests_get_a_400(dense_server, case):
    fields, message = MORE_BAD_REQUESTS[case]
    code, answer = post(dense_server, json.dumps({**GOOD, **fields}).encode())
    assert code == 400, answer
    assert message in answer["error"]["message"]


def test_a_lone_surrogate_gets_a_400(dense_server):
    body = json.dumps(GOOD).replace("A duck goes what?", "\\ud800 duck").encode()
    code, answer = post(dense_server, body)
    assert code == 400 and "surrogate" in answer["error"]["message"]


SHORT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "str"}}}]


def learn_by_heart(model, tokenizer, conversations: list[list[dict]], tools: list[dict], steps: int = 120):
    """Train `model` on whole rendered conversations until it says them back (what a tool-call SFT teaches, on a
    couple of examples), on one thread: a 64-wide model trains 5-10x faster so than on contended ones."""
    rows = [
        tokenizer(tokenizer.apply_chat_template(c, tools=tools, tokenize=False), add_special_tokens=False)
        for c in conversations
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = sum(
                model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["input_ids"]])).loss
                for r in rows
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def weather_conversations(reasoning: str | None = None) -> list[list[dict]]:
    """The weather question gets a `get_weather` call; the tool's result gets an answer quoting it."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Mirenburg"}}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning:
        turn["reasoning_content"] = reasoning
    asked = [{"role": "user", "content": "Weather in Mirenburg?"}, turn]
    answered = [
        *asked,
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny, 21 C."},
    ]
    return [asked, answered]


def train_tool_caller(tokenizer) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**SIZES, "hidden_size": 64}, vocab_size=len(tokenizer)))
    return learn_by_heart(model, tokenizer, weather_conversations(), SHORT_TOOLS)


def test_tool_call_round_trip_with_the_openai_client(tokenizer_dir):
    """Request with tools -> the model's call comes back as OpenAI `tool_calls` -> the client runs the tool and
    sends its result -> the final answer uses it; streamed and not."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = train_tool_caller(tokenizer)
    with in_thread(build_app(model, tokenizer, "tool-caller")) as url:
        api = client(url)
        messages = [{"role": "user", "content": "Weather in Mirenburg?"}]
        request = {"model": "tool-caller", "tools": SHORT_TOOLS, "temperature": 0, "max_tokens": 80}
        reply = api.chat.completions.create(messages=messages, **request).choices[0]
        assert reply.finish_reason == "tool_calls"
        (call,) = reply.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Mirenburg"}

        chunks = list(api.chat.completions.create(messages=messages, stream=True, **request))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        streamed = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
        assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
            (0, "get_weather", {"city": "Mirenburg"})
        ]
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""

        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        final = api.chat.completions.create(messages=messages, **request).choices[0]
        assert final.finish_reason == "stop" and not final.message.tool_calls
        assert "sunny, 21 C" in final.message.content
        assert ask(api, "tool-caller", messages, stream=True, tools=SHORT_TOOLS, max_tokens=80) == final.message.content
        # Without tools offered, the same markup is plain text: nothing is parsed out of it.
        plain = api.chat.completions.create(
            model="tool-caller", messages=messages[:1], temperature=0, max_tokens=40
        ).choices[0]
        assert plain.message.tool_calls is None


def test_minimind3_reasoning_and_tool_calls_round_trip(shared_fixtures):
    """MiniMind-3 (its tokenizer and template): with thinking open, the reasoning comes back as
    `reasoning_content` and the call as `tool_calls`, streamed and not; the tool's result gets the final answer."""
    tokenizer = load_tokenizer(shared_fixtures / "minimind3_reference" / "tokenizer")
    torch.manual_seed(0)
    config = MiniMind3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)
    )
    reasoning = "The weather tool knows this."
    model = learn_by_heart(MiniMind3ForCausalLM(config), tokenizer, weather_conversations(reasoning), SHORT_TOOLS)
    with in_thread(build_app(model, tokenizer, "m3")) as url:
        api = client(url)
        messages = [{"role": "user", "content": "Weather in Mirenburg?"}]
        request = {"model": "m3", "tools": SHORT_TOOLS, "temperature": 0, "max_tokens": 80}
        thinking = {"chat_template_kwargs": {"open_thinking": True}}
        reply = api.chat.completions.create(messages=messages, extra_body=thinking, **request).choices[0]
        assert reply.finish_reason == "tool_calls"
        assert reply.message.reasoning_content == reasoning
        (call,) = reply.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Mirenburg"})

        chunks = list(api.chat.completions.create(messages=messages, stream=True, extra_body=thinking, **request))
        deltas = [chunk.choices[0].delta for chunk in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
        assert [c.function.name for d in deltas for c in (d.tool_calls or [])] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        final = api.chat.completions.create(messages=messages, **request).choices[0]
        assert final.finish_reason == "stop" and final.message.content == "It is sunny, 21 C."
        assert ask(api, "m3", messages, stream=True, tools=SHORT_TOOLS, max_tokens=80) == final.message.content


def test_the_demos_kind_of_agent_round_trip():
    """The demo's kind of model (MiniMind-3, data/tokenizer3, its tool rows): the client asks with tools, gets
    `tool_calls`, runs the tool (`agent_client.run_with_tools`), sends the result and gets an answer holding the
    tool's value, streamed and not. (`make demo` does the same with its trained agent, on held-out rows.)"""
    data = Path(__file__).resolve().parents[1] / "data"
    tokenizer = load_tokenizer(data / "tokenizer3")
    row = json.loads((data / "tool_sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    system, user, call, tool, answer = row["conversations"]
    tools = json.loads(system["tools"])
    calls = [{"type": "function", "function": c} for c in json.loads(call["tool_calls"])]
    asked = [
        {"role": "system", "content": system["content"]},
        user,
        {"role": "assistant", "content": "", "tool_calls": calls},
    ]
    torch.manual_seed(0)
    config = MiniMind3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)
    )
    model = learn_by_heart(MiniMind3ForCausalLM(config), tokenizer, [asked, [*asked, tool, answer]], tools)
    expected_call = json.loads(row["conversations"][2]["tool_calls"])
    with in_thread(build_app(model, tokenizer, "agent")) as url:
        api = client(url)
        for stream in (False, True):
            answer, made = run_with_tools(
                api, "agent", [{"role": "system", "content": row["conversations"][0]["content"]},
                               row["conversations"][1]], tools, stream=stream, temperature=0, max_tokens=64,
            )  # fmt: skip
            assert made == expected_call, answer
            assert row["conversations"][-1]["content"] in answer


@pytest.mark.parametrize("form", ["dense", "moe"])
def test_python_m_serve_answers_the_openai_client(models, form, tmp_path):
    """The command as a user runs it, in its own process: plain and streamed replies equal the in-process ones."""
    port = free_port()
    argv = [sys.executable, "-m", "minimind_hf.serve", str(models[form]), "--port", str(port), "--log_level", "warning"]
    expected = reference(models[form])
    with in_subprocess(argv, port, tmp_path / "serve.log") as url:
        api = client(url)
        assert ask(api, str(models[form]), QUESTION) == expected(QUESTION)
        assert ask(api, str(models[form]), MULTI_TURN, stream=True) == expected(MULTI_TURN)
