"""The OpenAI-compatible API (with the official openai client) and the demo's Chat tab, on a live server in this process.

The tiny random model answers from a script (gen_helpers.scripted), so every answer is known in advance; what is
checked is the serving: rendering of the whole conversation, streaming, auth, limits and their HTTP errors."""

import json
import threading
import time

import httpx
import openai
import pytest
from gen_helpers import answering, never_eos, scripted, serving, slowed

import generate
from utils import demo
from utils.api import ApiSettings
from utils.chat import load_chat_template
from utils.cli import UserError
from utils.generation import Settings, load_generator, unwrapped

DEFAULTS = Settings(temperature=0, num_beams=1, max_new_tokens=32)
API = ApiSettings(model="tiny-chat", max_tokens=64, max_input_tokens=200)
AUTH = ("alice", "se:cret")
ANSWER = "Alpacas are gentle animals."
HISTORY = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Vicuna."},
    {"role": "user", "content": "Tell me about alpacas."},
]


@pytest.fixture(scope="module")
def gen(tiny_model):
    return load_generator(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def chat(gen):
    return load_chat_template("", gen.tokenizer)  # the tiny tokenizer has no template of its own: alpaca_chat


@pytest.fixture(scope="module")
def url(gen, chat):
    with serving(demo.build_app(gen, DEFAULTS, chat=chat, api=API), auth=AUTH) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}v1", api_key="se:cret", max_retries=0)


@pytest.fixture
def prompts(gen, monkeypatch):
    """Every prompt the generator is asked to answer, as rendered text (each path encodes its prompts once)."""
    seen, encode = [], gen.encode
    monkeypatch.setattr(gen, "encode", lambda prompts, *a, **k: (seen.extend(prompts), encode(prompts, *a, **k))[1])
    return seen


def says(gen, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"] + [gen.tokenizer.eos_token_id]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_answer_usage_and_the_rendered_conversation(gen, chat, client, prompts):
    with scripted(gen.model, says(gen, ANSWER)):
        reply = client.chat.completions.create(model="tiny-chat", messages=HISTORY, temperature=0)
    assert reply.choices[0].message.content == ANSWER and reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "tiny-chat"
    # The whole history reached the model, rendered by the chat template, ending with the prompt for the answer.
    expected = chat.render(HISTORY, add_generation_prompt=True)
    assert prompts == [expected] and "Answer briefly.\n\n### Instruction:\nWho are you?\n\n### Response:\nI am Vicuna.</s>" in expected
    assert reply.usage.prompt_tokens == gen.prompt_tokens(expected)
    assert reply.usage.completion_tokens == len(says(gen, ANSWER))


def test_streaming_sends_server_sent_events_ending_with_done(gen, client, url):
    with scripted(gen.model, says(gen, ANSWER)):
        chunks = list(client.chat.completions.create(model="tiny-chat", messages=HISTORY, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 4  # piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(says(gen, ANSWER))
    # On the wire: `data: {json}` events, the last one `data: [DONE]`.
    body = {"messages": HISTORY, "stream": True, "max_tokens": 3}
    with scripted(gen.model, says(gen, ANSWER)):
        raw = httpx.post(f"{url}v1/chat/completions", json=body, headers={"Authorization": "Bearer se:cret"}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_auth_is_the_demos_password(url):
    models = f"{url}v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic bm8="}):
        response = httpx.get(models, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(models, auth=AUTH).status_code == 200  # HTTP basic auth with the --auth user and password
    assert httpx.get(models, headers={"Authorization": "Bearer alice:se:cret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}v1", api_key="nope", max_retries=0).chat.completions.create(model="x", messages=HISTORY)


@pytest.mark.parametrize("request_, status, message", [
    (dict(max_tokens=1000), 400, "max_tokens is 1000; this server allows at most 64"),
    (dict(messages=[{"role": "user", "content": "alpaca " * 300}]), 413, "this server accepts at most 200"),
    (dict(messages=[{"role": "tool", "content": "x"}]), 400, "messages, turn 0: unknown role 'tool'"),
    (dict(messages=[{"role": "user", "content": " "}]), 400, "messages, turn 0: empty user turn"),
    (dict(messages=HISTORY[:3]), 400, "the last message should be the user's"),
    (dict(n=2), 400, "only n=1 is supported"),
    (dict(temperature=-1), 400, "temperature must be 0 for greedy or at least 0.001"),
    (dict(temperature=1e-45), 400, "temperature must be 0 for greedy or at least 0.001"),  # it can only overflow
    (dict(messages="hi"), 400, "messages: Input should be a valid list"),
])
def test_bad_requests_get_openai_style_errors(client, request_, status, message):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**(dict(model="tiny-chat", messages=HISTORY) | request_))
    assert caught.value.status_code == status
    assert message in caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", [dict(temperature=0), dict(temperature=1), dict(temperature=2), dict(temperature=0.7),
                                   dict(top_p=0.001), dict(top_p=1), dict(max_tokens=1), dict(max_tokens=API.max_tokens),
                                   dict(max_completion_tokens=API.max_tokens), dict(n=1), dict(stop=["a", "b", "c", "d"])])
def test_every_field_is_answered_at_its_bounds(gen, url, field):
    """Each request field at the ends of what it accepts, whole numbers sent as JSON integers (temperature 1)."""
    with scripted(gen.model, says(gen, "Yes.")):
        response = post(url, **field)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content == "Yes." or (field == dict(max_tokens=1) and "Yes.".startswith(content))  # its first token


@pytest.mark.parametrize("field, message", [
    (dict(temperature=-0.01), "temperature must be 0 for greedy or at least 0.001"), (dict(top_p=0), "top_p must be above 0"),
    (dict(top_p=1.01), "top_p must be above 0 and at most 1"), (dict(max_tokens=0), "must be at least 1"),
    (dict(max_tokens=API.max_tokens + 1), f"this server allows at most {API.max_tokens}"),
])
def test_every_field_is_refused_past_its_bounds(url, field, message):
    response = post(url, **field)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_too_large_and_broken_bodies(url):
    headers = {"Authorization": "Bearer se:cret", "Content-Type": "application/json"}
    broken = httpx.post(f"{url}v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = httpx.post(f"{url}v1/chat/completions", content=b" " * (API.max_body_bytes + 1), headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def raw_post(url: str, head: bytes, body: bytes, until: bytes) -> bytes:
    """Send a request's head and (part of a) body on a socket; what the server answers, read until `until` comes."""
    import socket

    port = int(url.rsplit(":", 1)[1].strip("/"))
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer se:cret\r\n" + head +
                    b"\r\n" + body)
        while until not in answer and (chunk := raw.recv(65536)):
            answer += chunk
    return answer


def test_a_body_is_refused_while_it_is_read(url):
    """A chunked body (no declared length) gets its 413 once it passes the limit, while the client is still sending:
    the server does not wait for the end of a body it will refuse."""
    chunk = b" " * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(API.max_body_bytes // len(chunk) + 1))
    answer = raw_post(url, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunks,  # no last chunk
                      until=b"request_too_large")
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_only_json_is_accepted(url, content_type):
    """What a web page can make a browser POST to another origin without a CORS preflight is refused, unanswered."""
    headers = {"Authorization": "Bearer se:cret"} | ({"Content-Type": content_type} if content_type else {})
    response = httpx.post(f"{url}v1/chat/completions", content=json.dumps({"messages": HISTORY}), headers=headers)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_cors_grants_only_pages_of_this_machine(url):
    """docs/serving.md: Gradio's CORS, reached at 127.0.0.1: a page from another origin gets no grant, so its browser
    neither sends a JSON POST (the preflight fails) nor lets it read an answer."""
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{url}v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})

    assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    assert preflight("http://localhost:3000").headers["access-control-allow-origin"] == "http://localhost:3000"


def test_json_with_a_charset_is_json(gen, url):
    headers = {"Authorization": "Bearer se:cret", "Content-Type": "application/json; charset=utf-8"}
    with scripted(gen.model, says(gen, ANSWER)):
        response = httpx.post(f"{url}v1/chat/completions", content=json.dumps({"messages": HISTORY}), headers=headers,
                              timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == ANSWER


def test_a_body_that_is_not_utf8_is_a_400(url):
    headers = {"Authorization": "Bearer se:cret", "Content-Type": "application/json"}
    body = '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")
    response = httpx.post(f"{url}v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]["message"]


def wait_until(condition, what: str, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def small_pool(gen, chat):
    """A server with one answer at a time and one waiting place; yields (url, its engine)."""
    app = demo.build_app(gen, DEFAULTS, chat=chat, api=API, concurrency_limit=1, max_queue=1)
    with serving(app) as url:
        yield url, app.engine


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}v1/chat/completions", json={"messages": HISTORY, **body}, timeout=60,
                      headers={"Authorization": "Bearer se:cret"})  # the key of `url`'s server; others need none


def test_requests_beyond_the_running_ones_wait_then_503_past_the_queue(gen, small_pool):
    url, engine = small_pool
    # The running answer takes 6 s (a loaded machine must not finish it before the others arrive; the tiny model's
    # context holds no more tokens); closing the stream ends it as soon as the checks are done.
    with never_eos(gen.model, gen.tokenizer.eos_token_id), slowed(gen.model, 0.1):
        with httpx.stream("POST", f"{url}v1/chat/completions", json={"messages": HISTORY, "stream": True,
                                                                     "max_tokens": 60}, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # answering: the only running place is taken
            waiting = threading.Thread(target=lambda: results.append(post(url, max_tokens=3)))
            results = []
            waiting.start()
            wait_until(lambda: len(engine.waiting) == 1, "the second request never queued")
            turned_away = post(url, max_tokens=3)  # the queue's one place is taken too
            assert turned_away.status_code == 503 and turned_away.headers["Retry-After"] == "5"
            assert turned_away.json()["error"]["code"] == "queue_full"
        waiting.join(timeout=60)  # the stream was closed: its place went to the waiting request, which is answered
    assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 3
    wait_until(lambda: engine.busy == 0, "a place is still taken")


def test_a_client_gone_before_its_answer_starts_is_dropped_from_the_queue(gen, chat, small_pool):
    """A streamed and a plain request wait behind a running one; both clients hang up before a token: both are dropped
    from the queue at once (not answered for nobody), then the running one is stopped by its own hang-up."""
    import socket

    url, engine = small_pool
    first = chat.render(HISTORY, add_generation_prompt=True)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with never_eos(gen.model, gen.tokenizer.eos_token_id), slowed(gen.model, 0.1):  # the first runs for 6 s
        with httpx.stream("POST", f"{url}v1/chat/completions", json={"messages": HISTORY, "stream": True,
                                                                     "max_tokens": 64}, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            for stream in (True, False):
                body = json.dumps({"messages": HISTORY, "stream": stream, "max_tokens": 60}).encode()
                with socket.create_connection(("127.0.0.1", port)) as raw:
                    raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    wait_until(lambda: len(engine.waiting) == 1, "the request never queued")
                wait_until(lambda: not engine.waiting, f"the hung-up request (stream={stream}) stayed queued")
                assert [job.prompt for job in engine.running] == [first]  # dropped, not answered for nobody
    wait_until(lambda: engine.busy == 0, "the running request's place was never freed")


def test_a_client_gone_during_the_stream_frees_its_place(gen, small_pool):
    url, engine = small_pool
    with never_eos(gen.model, gen.tokenizer.eos_token_id), slowed(gen.model, 0.02):
        with httpx.stream("POST", f"{url}v1/chat/completions", json={"messages": HISTORY, "stream": True,
                                                                     "max_tokens": 60}, timeout=60) as running:
            lines = running.iter_lines()
            while "content" not in next(lines) or not engine.running:  # tokens are arriving
                pass
            assert engine.busy == 1
    wait_until(lambda: engine.busy == 0, "the abandoned stream kept its place")
    assert post(url, max_tokens=2).status_code == 200  # and the next request is answered


def test_streamed_chunks_are_shaped_as_openais(gen, url):
    """One id and `created` per response, usage null until the last chunk, finish_reason for EOS, a stop string
    and max_tokens."""
    def chunks(**body):
        response = post(url, stream=True, stream_options={"include_usage": True}, **body)
        return [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]

    with slowed(gen.model, 0.3), scripted(gen.model, says(gen, ANSWER)):
        eos = chunks()  # 0.3 s a token: the answer spans seconds, each chunk would carry its own time.time()
    assert len({c["created"] for c in eos}) == 1 and len({c["id"] for c in eos}) == 1
    assert all(c["usage"] is None for c in eos[:-1]) and eos[-1]["usage"]["completion_tokens"] == len(says(gen, ANSWER))
    assert eos[-2]["choices"][0]["finish_reason"] == "stop" and eos[-1]["choices"] == []
    with scripted(gen.model, says(gen, ANSWER)):  # each script is one answer's
        stopped = chunks(stop=["gentle"])
    with scripted(gen.model, says(gen, ANSWER)):
        cut = post(url, stop="gentle").json()
    with scripted(gen.model, says(gen, ANSWER)):
        length = chunks(max_tokens=3)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in stopped if c["choices"]) == "Alpacas are "
    assert stopped[-2]["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Alpacas are"}, "finish_reason": "stop"}
    assert length[-2]["choices"][0]["finish_reason"] == "length" and length[-1]["usage"]["completion_tokens"] == 3
    assert post(url, stop=["a", "b", "c", "d", "e"]).status_code == 400


def test_many_concurrent_requests_are_all_answered_in_shared_passes(gen, chat):
    """40 clients at once on a pool of 8 running and 32 waiting places: none turned away, each gets its own answer,
    and the answers share forward passes (far fewer passes than tokens)."""
    def echo(prompt):
        return "You said " + prompt.rsplit("number ", 1)[1].split(".")[0]

    app = demo.build_app(gen, DEFAULTS, chat=chat, api=API, concurrency_limit=8, max_queue=32)
    replies, passes = {}, []
    counter = unwrapped(gen.model).register_forward_pre_hook(lambda module, args: passes.append(1))
    with serving(app) as url, answering(gen.model, gen.tokenizer, echo), slowed(gen.model, 0.02):
        def user(i):
            replies[i] = post(url, messages=[{"role": "user", "content": f"Repeat number {i}."}])

        threads = [threading.Thread(target=user, args=(i,)) for i in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert app.engine.busy == 0
    counter.remove()
    assert {i: r.status_code for i, r in replies.items()} == {i: 200 for i in range(40)}
    assert {i: r.json()["choices"][0]["message"]["content"] for i, r in replies.items()} == {i: f"You said {i}" for i in range(40)}
    # One at a time, each token is one forward pass (a prefill gives the first). Batched, the 40 prefills stay
    # but the other tokens share passes: at most half as many passes as those tokens, 8 rows running.
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies.values())
    print(f"{tokens} tokens in {len(passes)} forward passes")
    assert len(passes) - 40 <= (tokens - 40) / 2


def test_chat_tab_keeps_the_history(gen, chat, prompts):
    """The Chat tab through gradio_client: the second message is rendered after the first exchange; no /v1 without --api."""
    from gradio_client import Client

    with serving(demo.build_app(gen, DEFAULTS, chat=chat)) as url:
        client = Client(url, verbose=False)
        settings = (0, 0.75, 40, 1, 32, True)  # temperature, top_p, top_k, beams, max new tokens, stream
        with scripted(gen.model, says(gen, "I am Vicuna.")):
            first = client.predict("Who are you?", "Answer briefly.", *settings, api_name="/chat")
        with scripted(gen.model, says(gen, ANSWER)):
            second = client.predict("Tell me about alpacas.", "Answer briefly.", *settings, api_name="/chat")
        assert httpx.get(f"{url}v1/models").status_code == 404
    assert (first, second) == ("I am Vicuna.", ANSWER)
    assert prompts == [chat.render(HISTORY[:2], add_generation_prompt=True), chat.render(HISTORY, add_generation_prompt=True)]


def test_api_flag_reaches_the_app(tiny_model, monkeypatch):
    seen = {}
    monkeypatch.setattr(generate, "launch", lambda app, **kwargs: seen.update(app=app, **kwargs))
    generate.main(base_model=str(tiny_model), api=True, api_max_tokens=100, auth="alice:pw", chat_template="alpaca_chat",
                  compile=False)
    routes = [r.path for r in seen["app"].openai_routes(seen["auth"])]
    assert routes == ["/v1/chat/completions", "/v1/models"]
    engine = seen["app"].engine  # one pool for the page and the API, by default running 16 and queueing >= 200
    assert (engine.max_running, engine.max_waiting) == (16, 512)
    generate.main(base_model=str(tiny_model), api=True, compile=False, concurrency_limit=3, max_queue=7)
    assert (seen["app"].engine.max_running, seen["app"].engine.max_waiting) == (3, 7)


@pytest.mark.parametrize("flags, message", [
    (dict(api_max_tokens=0), "--api_max_tokens must be at least 1"),
    (dict(api_max_input_tokens=-1), "--api_max_input_tokens must be at least 0"),
    (dict(max_queue=-1), "--max_queue must be at least 0"),
    (dict(chat_template="no_such_template"), "no_such_template"),
])
def test_bad_api_and_chat_flags_are_one_line_before_serving(tiny_model, monkeypatch, flags, message):
    monkeypatch.setattr(generate, "launch", lambda *a, **k: pytest.fail("the server must not start"))
    with pytest.raises(UserError, match=message):
        generate.main(base_model=str(tiny_model), api=True, **flags)
