"""`bigmodel serve` driven by the official openai client: completions, streamed chat, concurrent clients batched
with the same answers as alone, a client leaving mid-stream, the API key, and malformed requests refused."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import pretrain_args

API_KEY = "test-key"
MAX_BATCH = 4  # under the 8 concurrent clients: some wait for a slot and join at a step boundary
CONTEXT = 256  # the model's positions: answers long enough to leave mid-stream


@pytest.fixture(scope="module")
def server(cli, tiny_data, tmp_path_factory):
    """One server (a real `bigmodel serve` process on a free port) over a tiny trained model."""
    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    settings = {"train.steps": 4, "checkpoint.every": 4, "model.max_seq_len": CONTEXT, "data.seq_len": 64}
    cli(*pretrain_args(run, tiny_data, settings))
    log = root / "serve.log"
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, not the suite's eight fake ones
    command = [sys.executable, "-m", "bigmodel_cli", "serve", str(run), "--port", "0", "--api-key", API_KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, "--max-batch", str(MAX_BATCH)], stderr=out, stdout=out, env=env)
    try:
        base = _wait_for_url(proc, log)
        client = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=60)
        yield {"client": client, "base": base, "model": str(run), "run": run}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_url(proc, log) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"bigmodel serve exited with {proc.returncode}:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if line.startswith("serving ") and "http://" in line:
                return line.split(" at ")[1].split()[0]
        time.sleep(0.2)
    raise AssertionError(f"bigmodel serve did not start:\n{log.read_text()}")


def _health(server) -> dict:
    return httpx.get(server["base"].removesuffix("/v1") + "/health").json()


def test_completion_matches_generate_and_honours_stop_and_seed(server, cli):
    client, model = server["client"], server["model"]
    answer = client.completions.create(model=model, prompt="the ", max_tokens=12, temperature=0)
    expected = cli("generate", server["run"], "--prompt", "the ", "--max-new-tokens", 12, "--temperature", 0).stdout
    assert "the " + answer.choices[0].text == expected.removesuffix("\n")
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == 12  # characters: "t" "h" "e" " "
    assert [m.id for m in client.models.list().data] == [model]

    text = answer.choices[0].text
    stop = text[5]  # a character the greedy answer holds: the answer ends just before its first appearance
    cut = client.completions.create(model=model, prompt="the ", max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [
        client.completions.create(model=model, prompt="the ", max_tokens=20, temperature=1.0, top_p=0.9, seed=seed)
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_chat_streams_the_same_answer_in_pieces(server):
    client, model = server["client"], server["model"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    pieces = [d.content for d in deltas if d.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 10  # rendered in the chat format


def test_eight_concurrent_clients_get_their_answers_alone(server):
    client, model = server["client"], server["model"]
    prompts = [f"{word} " for word in ("the", "and", "of", "to", "in", "it", "is", "was")]
    lengths = [8 + 5 * i for i in range(8)]  # answers of different lengths: slots free and refill mid-batch

    def ask(job):
        prompt, length = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=length, temperature=0).choices[0].text

    alone = [ask(job) for job in zip(prompts, lengths, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, zip(prompts, lengths, strict=True)))
    assert together == alone
    assert _health(server)["peak_active"] == MAX_BATCH  # they were decoded together, as many as there are slots


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    before = _health(server)["cancelled"]
    body = {"model": server["model"], "prompt": "the ", "max_tokens": CONTEXT - 8, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server["base"] + "/completions", json=body, headers=headers, timeout=30) as response:
        # Leave right after the first token: the ~250 still to come take the engine far longer than closing does
        assert next(line for line in response.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while (health := _health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == before + 1


def test_a_wrong_or_missing_api_key_is_refused(server):
    wrong = openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.completions.create(model=server["model"], prompt="the ", max_tokens=2)
    assert caught.value.status_code == 401 and "API key" in caught.value.message
    missing = httpx.post(server["base"] + "/completions", json={"model": server["model"], "prompt": "a"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def test_malformed_requests_get_a_4xx_that_says_what_is_wrong(server):
    model, base = server["model"], server["base"]
    completion = {"model": model, "prompt": "the "}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    cases = [  # (endpoint, body: a dict sent as JSON, or raw bytes), status, words the message must hold
        ("/chat/completions", b'{"model": "x", "messages": [', 400, "not valid JSON"),
        ("/completions", b"[1, 2]", 400, "JSON object"),
        ("/chat/completions", {"model": model}, 400, "messages: required"),
        ("/chat/completions", {**chat, "messages": []}, 400, "messages"),
        ("/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role"),
        ("/chat/completions", {**chat, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ("/completions", {**completion, "temperature": "hot"}, 400, "temperature"),
        ("/completions", {**completion, "temperature": -0.5}, 400, "temperature"),
        ("/completions", {**completion, "top_p": 1.5}, 400, "top_p"),
        ("/completions", {**completion, "n": 2}, 400, "n:"),
        ("/completions", {**completion, "max_tokens": 10 * CONTEXT}, 400, "ask for at most"),
        ("/completions", {**completion, "prompt": "x" * (2 * CONTEXT)}, 400, "context"),
        ("/completions", {**completion, "prompt": [10**9]}, 400, "token ids"),
        ("/completions", {**completion, "model": "gpt-4"}, 404, "does not exist"),
        ("/completions", {**completion, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/completions", {**completion, "prompt": "y" * (2 << 20)}, 413, "bytes"),
        ("/embeddings", completion, 404, "no such endpoint"),
        # Fields that would change the answer are refused rather than ignored, and a message needs its content.
        ("/completions", {**completion, "logit_bias": {"4": -100}}, 400, "logit_bias"),
        ("/completions", {**completion, "best_of": 3}, 400, "best_of"),
        ("/completions", {**completion, "suffix": "zzz"}, 400, "suffix"),
        ("/chat/completions", {**chat, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("/chat/completions", {**chat, "messages": [{"role": "user"}]}, 400, "messages[0].content: required"),
        ("/chat/completions", {**chat, "messages": [{"role": "user", "content": None}]}, 400, "content: required"),
    ]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path, body, status, words in cases:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = httpx.post(base + path, headers=headers, timeout=30, **kwargs)
        assert response.status_code == status, (
            path,
            body if isinstance(body, bytes) else str(body)[:80],
            response.text,
        )
        error = response.json()["error"]
        assert words in error["message"] and error["type"], (words, error)
    # The error's param names the request field, not the validator's names for what it tried.
    params = {"stop": 5, "stream": "yes", "prompt": [[1, 2], [3]], "max_tokens": 0}
    for field, value in params.items():
        response = httpx.post(base + "/completions", headers=headers, json={**completion, field: value}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    response = httpx.post(base + "/chat/completions", headers=headers, json={**chat, "messages": image}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"
    assert httpx.post(base + "/chat/completions", headers=headers, json={**chat, "user": "u1"}).status_code == 200
    # The official client raises the server's message for a refused field
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server["client"].chat.completions.create(model=model, messages=chat["messages"], top_p=0)
    answer = server["client"].completions.create(model=model, prompt="the ", max_tokens=3, temperature=0)
    assert len(answer.choices[0].text) == 3 and _health(server)["active"] == 0


def test_serve_refuses_bad_options_before_serving(server, cli):
    refused = cli("serve", server["run"], "--max-batch", 0, ok=False)
    assert refused.exit_code == 2 and "--max-batch must be in [1, 256]" in refused.stderr
    taken = int(server["base"].split(":")[2].split("/")[0])  # the running server's port
    busy = cli("serve", server["run"], "--port", taken, ok=False)
    assert busy.exit_code == 2 and "cannot listen on 127.0.0.1" in busy.stderr
    too_long = cli("serve", server["run"], "--port", 0, "--max-model-len", CONTEXT + 1, ok=False)
    assert too_long.exit_code == 2 and f"--max-model-len must be in [1, {CONTEXT}]" in too_long.stderr
    int4 = cli("serve", server["run"], "--port", 0, "--quantize", "int4", ok=False)
    assert int4.exit_code == 2 and "--quantize" in int4.stderr and len(int4.stderr.strip().splitlines()) == 1


class _Chars:
    """A tokenizer stand-in: token i is chr(i)."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_streamed_text_holds_back_what_could_start_a_stop_string():
    from bigmodel_cli.serve.protocol import TextStream

    stream = TextStream(_Chars(), frozenset({0}), ("END", "xy"))
    shown = [stream.add(ord(c)) for c in "abExNEN"]
    # "E" may begin "END" and "x" may begin "xy": each waits until the next character rules it out
    assert shown == ["a", "b", "", "E", "xN", "", ""] and not stream.stopped
    assert stream.add(ord("D")) == "" and stream.add(0) == ""  # the stop string is never shown
    assert stream.stopped and stream.text == "abExN" and stream.flush() == ""


def test_an_engine_failure_fails_its_requests_and_the_engine_goes_on():
    import threading

    import jax
    from flax import nnx

    from bigmodel_cli import parallel
    from bigmodel_cli.config import MeshConfig
    from bigmodel_cli.model.params import LoadedModel
    from bigmodel_cli.model.transformer import Transformer
    from bigmodel_cli.serve.engine import Engine, Request
    from tests.test_generate import CFG

    mesh = parallel.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    loaded = LoadedModel(CFG, graphdef, nnx.to_pure_dict(state), mesh, None, 0, CFG.max_seq_len, "")
    engine = Engine(loaded, 2, 32)
    engine.start()
    real_step, results = engine._run_step, {}

    def broken_step(view=0):
        raise RuntimeError("device lost\ndetails")

    def ask(name: str) -> threading.Event:
        done = threading.Event()

        def emit(token, finish):
            results.setdefault(name, []).append((token, finish))
            if finish:
                done.set()

        engine.submit(Request([1, 2, 3], 5, emit))
        return done

    try:
        engine._run_step = broken_step
        assert ask("failed").wait(30)
        assert results["failed"][-1] == (-1, "error") and engine.last_error == "RuntimeError: device lost"
        engine._run_step = real_step
        assert ask("after").wait(30)
        assert len(results["after"]) == 5 and results["after"][-1][1] == "length" and engine.active() == 0
    finally:
        engine.close()
