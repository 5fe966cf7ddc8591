"""The keep-alive engine (llm_flash_moe/service/): every feature the same through it as in the llm process,
its faults, and the OpenAI-compatible endpoint with the real ``openai`` client.

One engine serves the module's tests (engines take seconds to start); the tests that kill or replace it
start another. Engines get tests/engine_hooks on their PYTHONPATH: it steers the sampler from a JSON file
(scripts, a delay per token) as tests/test_conversations.py's ``steer`` does in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import llm
from llm.cli import cli

from conftest import logged_turns, stop_engines
from llm_flash_moe.engine import prompt_cache
from llm_flash_moe import registry
from llm_flash_moe.service import client, protocol

pytest.importorskip("mlx.core")

HOOKS = Path(__file__).parent / "engine_hooks"
MODEL = "tiny-flash"
QUIET = ["-o", "temperature", "0", "-o", "thinking", "0"]
WEATHER = 'def get_weather(city: str) -> str:\n    "The weather in a city"\n    return "sunny in " + city\n'
TOOL_CALL = ("I will check.\n</think>\n\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>")
TOOL_ANSWER = "It is sunny.\n</think>\n\nThe weather in Paris is sunny."
LLM = str(Path(sys.executable).with_name("llm"))
LONG = " ".join(["fox"] * 400)  # a scripted answer longer than any max_tokens here: the model never ends it early


@pytest.fixture(scope="module")
def engine_user(tmp_path_factory, tiny_model):
    """A user directory with the tiny model, where llm commands use the engine (keep_alive 120)."""
    path = tmp_path_factory.mktemp("engine-user")
    saved = {k: os.environ.get(k) for k in ("LLM_USER_PATH", protocol.KEEP_ALIVE_ENV, "PYTHONPATH",
                                            "LLM_FLASH_MOE_TEST_STEER", "LLM_FLASH_MOE_TEST_MODEL",
                                            prompt_cache.DISK_ENV)}
    os.environ.update({"LLM_USER_PATH": str(path), protocol.KEEP_ALIVE_ENV: "120",
                       "PYTHONPATH": os.pathsep.join([str(HOOKS)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])),
                       "LLM_FLASH_MOE_TEST_STEER": str(path / "steer.json"), "LLM_FLASH_MOE_TEST_MODEL": "tiny"})
    os.environ.pop(prompt_cache.DISK_ENV, None)
    os.environ.pop("LLM_RAISE_ERRORS", None)
    registry.register("tiny", tiny_model)
    steer()
    yield path
    try:
        stop_engines()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def steer(scripts=(), delay=0.0) -> None:
    Path(os.environ["LLM_FLASH_MOE_TEST_STEER"]).write_text(json.dumps({"scripts": list(scripts), "delay": delay}))


def run(*args, input=None, ok=True):
    result = CliRunner().invoke(cli, list(args), input=input)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def engine_pid(name="tiny"):
    state = protocol.read_state(name)
    return state["pid"] if state and protocol.alive(state["pid"]) else None


def rows(user):
    out = logged_turns(user)
    for row in out:
        row["response_json"] = json.loads(row["response_json"])
    return out


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    return check()


def spawn(*args):
    return subprocess.Popen([LLM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_text(name="tiny"):
    return protocol.log_path(name).read_text()


# ------------------------------------------------------------------------------ the same through the engine


def test_the_same_answer_and_logs_as_in_process(engine_user):
    prompt = ["-m", MODEL, "Tell me about foxes", "-o", "max_tokens", "12", "-o", "prompt_cache", "0", *QUIET]
    local = run(*prompt, "-o", "keep_alive", "0")
    assert engine_pid() is None  # keep_alive 0: no engine
    served = run(*prompt)
    pid = engine_pid()
    assert pid is not None and pid != os.getpid()
    assert served.stdout == local.stdout and served.stdout.strip()
    first, second = rows(engine_user)[-2:]
    assert (first["input_tokens"], first["output_tokens"]) == (second["input_tokens"], second["output_tokens"])
    assert set(first["response_json"]) == set(second["response_json"])
    assert second["response_json"]["bytes_read"] > 0  # an empty bank: the engine read the experts
    run(*prompt)
    assert engine_pid() == pid  # the same engine again, its bank warm:
    assert rows(engine_user)[-1]["response_json"]["bytes_read"] == 0


def test_follow_ups_continue_from_the_engines_memory_then_disk(engine_user):
    run("-m", MODEL, "The quick brown fox", "-o", "max_tokens", "8", *QUIET)
    run("-c", "And then?", "-o", "max_tokens", "8", "-o", "temperature", "0")
    turn = rows(engine_user)[-1]["response_json"]
    assert turn["prompt_cache"] == "memory" and turn["prompt_tokens_cached"] > 0
    assert turn["thinking"] is False  # the conversation's choice, kept across turns
    old = engine_pid()
    assert "Stopped the engine of tiny" in run("flash-moe", "stop", "tiny").output
    assert not protocol.alive(old) and engine_pid() is None
    run("-c", "Once more", "-o", "max_tokens", "8", "-o", "temperature", "0")
    turn = rows(engine_user)[-1]["response_json"]
    assert turn["prompt_cache"] == "disk" and turn["prompt_tokens_cached"] > 0  # a new engine: from disk
    assert engine_pid() not in (None, old)


def test_reasoning_streams_as_reasoning(engine_user):
    steer(["Let me think.\n</think>\n\nFoxes are quick."])
    result = run("-m", MODEL, "Foxes?", "-o", "thinking", "1", "-o", "max_tokens", "60")
    assert result.stdout.strip() == "Foxes are quick."
    logged = json.loads(run("logs", "--json", "-n", "1").output)[0]
    assert "Let me think." in json.dumps(logged)  # the reasoning part, logged by this process


def test_tool_call_round_trip(engine_user):
    steer([TOOL_CALL, TOOL_ANSWER])
    result = run("-m", MODEL, "--functions", WEATHER, "What is the weather in Paris?", "-o", "max_tokens", "80")
    assert result.stdout.strip().endswith("The weather in Paris is sunny.")
    logs = json.loads(run("logs", "--json", "-n", "2").output)
    assert logs[0]["tool_calls"][0]["name"] == "get_weather"
    assert logs[0]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert logs[1]["tool_results"][0]["output"] == "sunny in Paris"
    assert rows(engine_user)[-1]["response_json"]["prompt_cache"] == "memory"


def test_schema_answer_validates(engine_user):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    result = run("-m", MODEL, "--schema", json.dumps(schema), "A person", "-o", "max_tokens", "80", *QUIET)
    jsonschema.validate(json.loads(result.stdout), schema)
    assert rows(engine_user)[-1]["response_json"]["constrained_tokens"] > 0


def test_async_model(engine_user):
    expected = run("-m", MODEL, "Async foxes", "-o", "max_tokens", "8", "-o", "prompt_cache", "0", *QUIET).stdout

    async def ask():
        model = llm.get_async_model(MODEL)
        response = model.prompt("Async foxes", max_tokens=8, prompt_cache=False, temperature=0, thinking=False)
        return "".join([chunk async for chunk in response])

    import asyncio

    assert asyncio.run(ask()).strip() == expected.strip()


def test_llm_chat(engine_user):
    result = run("chat", "-m", MODEL, "-o", "max_tokens", "6", *QUIET, input="hello\nagain\nquit\n")
    assert "Chatting with tiny-flash" in result.output
    second = rows(engine_user)[-1]["response_json"]
    assert second["prompt_cache"] == "memory" and second["prompt_tokens_cached"] > 0


def test_concurrent_commands_share_one_engine_in_turn(engine_user):
    run("-m", MODEL, "warm", "-o", "max_tokens", "1", *QUIET)  # the engine is up
    pid = engine_pid()
    served = client.request("tiny", {"type": "status"})["served"]
    steer([LONG, LONG], delay=0.1)
    try:
        first = spawn("-m", MODEL, "one", "-o", "max_tokens", "40", *QUIET)
        second = spawn("-m", MODEL, "two", "-o", "max_tokens", "40", *QUIET)
        outputs = [p.communicate(timeout=120) for p in (first, second)]
    finally:
        steer()
    assert first.returncode == second.returncode == 0, outputs
    assert any("is answering another command; waiting for it (1 ahead)" in err for _, err in outputs), outputs
    status = client.request("tiny", {"type": "status"})
    assert status["pid"] == pid and status["served"] == served + 2  # one engine, one bank, both served


# ------------------------------------------------------------------------------ images through the engine

IMAGE = ["-o", "temperature", "0", "-o", "thinking", "0", "-o", "max_tokens", "10"]


@pytest.fixture(scope="module")
def vis(engine_user, vision_model):
    """The tiny vision model (tests/test_vision.py's) as "vis-flash" in the engine's user directory."""
    pytest.importorskip("mlx_vlm")
    registry.register("vis", vision_model)
    return "vis-flash"


@contextmanager
def web(files: dict):
    """A local web server of ``files`` (path -> bytes, or None: a HEAD says it is a PNG and a GET fails);
    yields (base URL, the paths it was asked to GET)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    gets = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            data = files.get(self.path)
            found = data is not None or (self.path in files and not body)
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png" if found else "text/plain")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def do_GET(self):
            gets.append(self.path)
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gets
    finally:
        server.shutdown()
        server.server_close()


def test_images_the_same_through_the_engine(engine_user, vis, pictures):
    """`-a` files and URLs answer as in the llm process (the same text and tokens logged), a follow-up by
    `llm -c` continues from the engine's memory, and only the llm process fetches a URL (the engine never
    opens the user's files or the web: the llm process carries the bytes)."""
    args = ["-m", vis, "-a", str(pictures["a"]), "-a", str(pictures["c"]), *IMAGE, "What is in the picture?"]
    local = run(*args, "-o", "keep_alive", "0", "-o", "prompt_cache", "0")
    served = run(*args, "-o", "prompt_cache", "0")
    assert engine_pid("vis") is not None
    assert served.stdout == local.stdout and served.stdout.strip()
    first, second = rows(engine_user)[-2:]
    assert (first["input_tokens"], first["output_tokens"]) == (second["input_tokens"], second["output_tokens"])
    run("-m", vis, "-a", str(pictures["a"]), *IMAGE, "What is in the picture?")
    run("-c", *IMAGE, "And the colours?")  # the image comes back from logs.db, carried again
    follow = rows(engine_user)[-1]["response_json"]
    assert follow["prompt_cache"] == "memory" and follow["prompt_tokens_cached"] > 0
    with web({"/a.png": pictures["a"].read_bytes()}) as (url, gets):
        args = ["-m", vis, "-a", f"{url}/a.png", *IMAGE, "What is in the picture?", "-o", "prompt_cache", "0"]
        local = run(*args, "-o", "keep_alive", "0")
        assert gets == ["/a.png"]
        served = run(*args)
        assert gets == ["/a.png", "/a.png"]  # one download per command: the llm process's
    assert served.stdout == local.stdout and served.stdout.strip()


def test_image_errors_are_the_same_line_through_the_engine(engine_user, vis, pictures, tmp_path):
    """An unreadable image (a file or a URL, named as the user gave it), one over the size limit, an image
    to a text-only model: the same one line both ways, nothing logged."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(pictures["a"].read_bytes()[:64])
    os.truncate(huge, 65 * 2**20)  # sparse: over the 64 MiB limit, refused before it is read
    with web({"/gone.png": None}) as (url, _):
        cases = {"cannot read the image " + str(pictures["broken"]): ["-m", vis, "-a", str(pictures["broken"])],
                 f"cannot read the image {url}/gone.png: ": ["-m", vis, "-a", f"{url}/gone.png"],
                 "68.2 MB, more than the 64 MiB one image may be": ["-m", vis, "-a", str(huge)],
                 "tiny-flash was prepared without a vision encoder": ["-m", MODEL, "-a", str(pictures["a"])]}
        for expected, args in cases.items():
            before = len(rows(engine_user))
            local = run(*args, "hi", "-o", "keep_alive", "0", ok=False)
            served = run(*args, "hi", ok=False)
            assert local.exit_code == served.exit_code == 1
            assert served.stderr == local.stderr and served.stderr.count("\n") == 1, (served.stderr, local.stderr)
            assert served.stderr.startswith("Error: ") and expected in served.stderr, served.stderr
            assert len(rows(engine_user)) == before


def test_without_mlx_vlm_in_the_engine_the_error_names_the_extra(engine_user, vis, pictures, tmp_path, monkeypatch):
    args = ["-m", vis, "-a", str(pictures["a"]), "hi"]
    before = len(rows(engine_user))
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # this process: import mlx_vlm raises ImportError
    local = run(*args, "-o", "keep_alive", "0", ok=False)
    monkeypatch.undo()
    fake = tmp_path / "without-vision" / "mlx_vlm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("mlx_vlm is not installed")\n')
    stop_engines()
    saved = os.environ["PYTHONPATH"]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(fake.parent), saved])  # the engine's environment
    try:
        served = run(*args, ok=False)
    finally:
        os.environ["PYTHONPATH"] = saved
        stop_engines()
    assert local.exit_code == served.exit_code == 1
    assert served.stderr == local.stderr and "[vision]" in served.stderr and served.stderr.count("\n") == 1
    assert len(rows(engine_user)) == before  # nothing logged as a success


# ------------------------------------------------------------------------------ faults


def test_engine_killed_mid_answer(engine_user):
    run("-m", MODEL, "warm", "-o", "max_tokens", "1", *QUIET)
    pid = engine_pid()
    steer([LONG], delay=0.1)
    try:
        command = spawn("-m", MODEL, "a long answer", "-o", "max_tokens", "200", *QUIET)
        assert wait_for(lambda: client.request("tiny", {"type": "status"})["busy"])
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        out, err = command.communicate(timeout=10)
    finally:
        steer()
    assert command.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "engine (pid" in lines[0] and "stopped in the middle of the answer" in lines[0], err
    run("-m", MODEL, "again", "-o", "max_tokens", "4", *QUIET)  # a fresh engine
    assert engine_pid() not in (None, pid)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_client_gone_stops_the_generation(engine_user, how):
    run("-m", MODEL, "warm", "-o", "max_tokens", "1", *QUIET)
    pid, before = engine_pid(), log_text().count("stopped a generation")
    steer([LONG], delay=0.1)
    try:
        command = spawn("-m", MODEL, "a long answer", "-o", "max_tokens", "300", *QUIET)
        assert wait_for(lambda: client.request("tiny", {"type": "status"})["busy"])
        time.sleep(0.5)
        command.send_signal(how)
        command.communicate(timeout=10)
        # The engine stops within a token or two (0.1 s each here), not after the 300:
        assert wait_for(lambda: log_text().count("stopped a generation") > before, timeout=3)
        assert wait_for(lambda: not client.request("tiny", {"type": "status"})["busy"], timeout=3)
    finally:
        steer()
    run("-m", MODEL, "still healthy", "-o", "max_tokens", "4", *QUIET)
    assert engine_pid() == pid


def test_stale_socket_is_replaced(engine_user):
    stop_engines()
    path = protocol.socket_path("tiny")
    path.unlink(missing_ok=True)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # a socket file nobody listens on, as a killed engine leaves it
    left.close()
    run("-m", MODEL, "hi", "-o", "max_tokens", "2", *QUIET)
    assert engine_pid() is not None


FAKE_ENGINE = """
import os, socket, sys, time
from llm_flash_moe.service import protocol
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(4)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    channel = protocol.Channel(conn)
    channel.receive()
    channel.send({"type": "hello", "protocol": protocol.PROTOCOL, "build": "0.0.1+old", "model": sys.argv[2],
                  "pid": os.getpid()})
    conn.close()
"""


def test_engine_of_another_version_is_replaced(engine_user, tiny_model):
    stop_engines()
    path = protocol.socket_path("tiny")
    path.unlink(missing_ok=True)
    fake = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, str(path), protocol.engine_identity("tiny", tiny_model)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().strip() == "ready"
        run("-m", MODEL, "hi", "-o", "max_tokens", "2", *QUIET)
        assert fake.wait(timeout=15) == -signal.SIGTERM  # ended, never used
        assert engine_pid() not in (None, fake.pid)
    finally:
        if fake.poll() is None:
            fake.kill()


def test_reprepared_model_gets_a_new_engine_and_idle_exit(engine_user, tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    registry.register("copy", copy)
    run("-m", "copy-flash", "hi", "-o", "max_tokens", "2", *QUIET)
    first = engine_pid("copy")
    manifest = copy / "manifest.json"
    os.utime(manifest, ns=(time.time_ns(), time.time_ns()))  # as `prepare` writing it again
    run("-m", "copy-flash", "hi", "-o", "max_tokens", "2", "-o", "keep_alive", "1", *QUIET)
    second = engine_pid("copy")
    assert second not in (None, first) and not protocol.alive(first)
    # keep_alive 1: the engine exits a second after its last request, and says so in its log
    assert wait_for(lambda: not protocol.alive(second), timeout=10)
    assert "idle for 1 s: exiting" in log_text("copy") and protocol.read_state("copy") is None


def test_an_engine_that_cannot_load_says_what_in_process_says(engine_user, tiny_model, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_model, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    registry.register("damaged", copy)
    try:
        local = run("-m", "damaged-flash", "hi", "-o", "keep_alive", "0", ok=False)
        served = run("-m", "damaged-flash", "hi", ok=False)
    finally:
        registry.unregister("damaged")
    assert local.exit_code == served.exit_code == 1
    assert served.stderr == local.stderr and served.stderr.startswith("Error: ") and served.stderr.count("\n") == 1


# ------------------------------------------------------------------------------ the OpenAI-compatible endpoint


@contextmanager
def serving(user, name="tiny"):
    """`llm flash-moe serve NAME --http PORT` in the background; (an openai client for it, its log)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    stop_engines()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log_path = user / f"serve-{name}.log"
    log = open(log_path, "w")
    server = subprocess.Popen([LLM, "flash-moe", "serve", name, "--http", str(port)], stdout=log, stderr=log)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def up():
        try:
            return [m.id for m in api.models.list()]
        except openai.APIConnectionError:
            return None

    try:
        assert wait_for(up, timeout=60) == [f"{name}-flash"], log_path.read_text()
        yield api, log_path
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def endpoint(engine_user):
    with serving(engine_user) as served:
        yield served


def ask(api, content="Tell me about foxes", **kwargs):
    return api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                       **{"temperature": 0, "max_tokens": 10, **kwargs,
                                          "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})


def test_endpoint_streams_text_and_usage(endpoint):
    api, _ = endpoint
    whole = ask(api)
    chunks = list(ask(api, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_endpoint_tool_call_round_trip(endpoint):
    api, _ = endpoint
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    steer([TOOL_CALL, TOOL_ANSWER])
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = api.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny in Paris"}]
    second = api.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=80)
    assert second.choices[0].message.content == "The weather in Paris is sunny."


def test_endpoint_schema_answer_validates(endpoint):
    jsonschema = pytest.importorskip("jsonschema")
    api, _ = endpoint
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    reply = ask(api, "A person", max_tokens=80, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_endpoint_two_clients_at_once(endpoint):
    api, _ = endpoint
    expected = ask(api, "Two at once", max_tokens=20).choices[0].message.content
    steer(delay=0.05)
    results = []
    try:
        threads = [threading.Thread(target=lambda: results.append("".join(
            c.choices[0].delta.content or "" for c in ask(api, "Two at once", max_tokens=20, stream=True)
            if c.choices))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        steer()
    assert results == [expected, expected]


def test_endpoint_client_disconnects_mid_stream(endpoint):
    api, log = endpoint
    before = log.read_text().count("stopped a generation")
    steer([LONG], delay=0.1)
    try:
        stream = ask(api, "A long one", max_tokens=300, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        assert wait_for(lambda: log.read_text().count("stopped a generation") > before, timeout=5)
    finally:
        steer()
    assert ask(api).choices[0].message.content  # the engine is fine


def test_endpoint_refuses_what_it_cannot_do(endpoint):
    import openai

    api, _ = endpoint
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="other-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="stop sequences"):
        ask(api, stop=["\n"])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(api, max_tokens=0)


def test_endpoint_images_as_data_uris(engine_user, vis, pictures):
    """OpenAI ``image_url`` parts holding data: URIs (what editors send) answer as `llm -a` does; a web URL
    or a type that is not an image is refused with a 400 that says so (the engine does not fetch the web)."""
    import base64

    import openai

    question = "What is in the picture?"
    expected = run("-m", vis, "-a", str(pictures["a"]), *IMAGE, question, "-o", "keep_alive", "0").stdout.strip()
    data = base64.b64encode(pictures["a"].read_bytes()).decode()

    def ask_with(url):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        return api.chat.completions.create(model=vis, messages=[{"role": "user", "content": content}], temperature=0,
                                           max_tokens=10, extra_body={"chat_template_kwargs": {"enable_thinking": False}})

    with serving(engine_user, "vis") as (api, _):
        assert ask_with(f"data:image/png;base64,{data}").choices[0].message.content.strip() == expected
        with pytest.raises(openai.BadRequestError, match="does not fetch images from the web"):
            ask_with("https://example.com/a.png")
        with pytest.raises(openai.BadRequestError, match="not an image type"):
            ask_with(f"data:text/plain;base64,{data}")
        with pytest.raises(openai.BadRequestError, match="cannot read the image"):
            ask_with("data:image/png;base64," + base64.b64encode(b"not a picture").decode())


def test_an_engine_that_cannot_start_is_one_line_not_a_hang(engine_user, tmp_path):
    stop_engines()
    broken = tmp_path / "broken" / "llm_flash_moe"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("a broken install")\n')
    saved = os.environ["PYTHONPATH"]
    os.environ["PYTHONPATH"] = str(broken.parent)  # what the engine process imports (this one has its modules)
    try:
        result = run("-m", MODEL, "hi", ok=False)
    finally:
        os.environ["PYTHONPATH"] = saved
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the tiny-flash engine could not start: RuntimeError: a broken install")
    assert result.stderr.count("\n") == 1 and str(protocol.log_path("tiny")) in result.stderr


def test_ps_stop_and_the_files_are_private(engine_user):
    run("-m", MODEL, "hi", "-o", "max_tokens", "2", *QUIET)
    pid = engine_pid()
    listing = run("flash-moe", "ps").output
    assert f"tiny   {pid}" in listing and str(protocol.socket_path("tiny")) in listing
    assert os.stat(protocol.engines_dir()).st_mode & 0o777 == 0o700
    assert os.stat(protocol.socket_path("tiny")).st_mode & 0o777 == 0o600
    assert run("flash-moe", "stop").output.strip() == f"Stopped the engine of tiny (pid {pid})"
    assert run("flash-moe", "ps").output.strip() == "No flash-moe engine is running."


def test_a_socket_path_too_long_for_af_unix_goes_to_a_short_private_directory(monkeypatch, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("LLM_USER_PATH", str(deep))
    path = protocol.socket_path("tiny")
    assert len(os.fsencode(protocol.engines_dir() / "tiny.sock")) > protocol.SOCKET_PATH_MAX
    assert len(os.fsencode(path)) <= protocol.SOCKET_PATH_MAX and path.parent.name == f"llm-flash-moe-{os.getuid()}"
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # it binds
    listener.close()
    path.unlink()


def test_messages_are_bounded(monkeypatch):
    """A message over MAX_MESSAGE_BYTES is refused in one line by the sender, and dropped (the connection with
    it) by the receiver, never read into memory whole."""
    from llm_flash_moe.errors import FlashMoeError

    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 200)
    left, right = socket.socketpair()
    sender, receiver = protocol.Channel(left), protocol.Channel(right)
    try:
        sender.send({"type": "hello", "text": "x" * 100})
        assert receiver.receive() == {"type": "hello", "text": "x" * 100}
        with pytest.raises(FlashMoeError, match="MB with its images, more than the .* one request to the engine may be"):
            sender.send({"type": "generate", "text": "x" * 300})
        left.sendall(b'{"type": "generate", "text": "' + b"x" * 300 + b'"}\n')  # a peer that ignores the limit
        assert receiver.receive() is None
    finally:
        sender.close()
        receiver.close()


def test_carried_images_round_trip_and_what_does_not_hold_is_an_unreadable_image(tmp_path, monkeypatch):
    """What the llm process carries to the engine: an image's bytes and the user's label, or the error reading
    it gave; a damaged or oversized carried image becomes an unreadable image in the engine, never a crash."""
    from llm.parts import AttachmentPart, Message, TextPart

    from llm_flash_moe.plugin import images

    picture = tmp_path / "a.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    messages = [Message(role="user", parts=[AttachmentPart(attachment=llm.Attachment(path=str(picture))),
                                            AttachmentPart(attachment=llm.Attachment(path=str(tmp_path / "gone.png"))),
                                            TextPart(text="Compare them.")])]
    back = images.messages_from_wire(json.loads(json.dumps(images.wire_messages(messages))))
    good, gone, text = back[0].parts
    assert good.attachment.content_bytes() == picture.read_bytes() and good.attachment.path == str(picture)
    assert gone.attachment.path == str(tmp_path / "gone.png")
    with pytest.raises(images.UnreadableImage, match=r"\[Errno 2\] No such file or directory"):
        gone.attachment.content_bytes()
    assert text == TextPart(text="Compare them.")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    assert "more than the" in images.CarriedImage.read(llm.Attachment(path=str(picture))).error  # before reading
    for hostile in (None, 5, {"content": 7}, {"content": "not base64!"}, {"content": "A" * 400}):
        with pytest.raises(images.UnreadableImage):
            images.CarriedImage.from_wire(hostile).content_bytes()
