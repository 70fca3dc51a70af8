"""The OpenAI-compatible API (with the official openai client) and the demo's Chat tab, on a live server in this process.

The tiny random model answers from a script (gen_helpers.scripted), so every answer is known in advance; what is
checked is the serving: rendering of the whole conversation, streaming, auth, limits and their HTTP errors."""

import json
import time

import httpx
import openai
import pytest
from gen_helpers import never_eos, scripted, serving, slowed

import generate
from utils import demo
from utils.api import ApiSettings
from utils.chat import load_chat_template
from utils.cli import UserError
from utils.generation import Settings, load_generator

DEFAULTS = Settings(temperature=0, num_beams=1, max_new_tokens=32)
API = ApiSettings(model="tiny-chat", max_tokens=64, max_input_tokens=200, concurrency=1)
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
    """Every prompt the generator is asked to answer, as rendered text."""
    seen = []
    for name in ("stream", "complete"):
        method = getattr(gen, name)
        monkeypatch.setattr(gen, name, lambda p, *a, _m=method, **k: (seen.extend([p] if isinstance(p, str) else p), _m(p, *a, **k))[1])
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
    (dict(temperature=-1), 400, "temperature must be at least 0"),
    (dict(messages="hi"), 400, "messages: Input should be a valid list"),
])
def test_bad_requests_get_openai_style_errors(client, request_, status, message):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**(dict(model="tiny-chat", messages=HISTORY) | request_))
    assert caught.value.status_code == status
    assert message in caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"


def test_too_large_and_broken_bodies(url):
    headers = {"Authorization": "Bearer se:cret", "Content-Type": "application/json"}
    broken = httpx.post(f"{url}v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = httpx.post(f"{url}v1/chat/completions", content=b" " * (API.max_body_bytes + 1), headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_a_request_beyond_the_concurrency_limit_gets_429_until_a_slot_frees(gen, client):
    with never_eos(gen.model, gen.tokenizer.eos_token_id), slowed(gen.model, 0.05):
        busy = client.chat.completions.create(model="tiny-chat", messages=HISTORY, max_tokens=60, stream=True)
        next(iter(busy))  # the first answer is being generated: the only slot is taken
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="tiny-chat", messages=HISTORY, max_tokens=2)
        assert caught.value.body["code"] == "rate_limit_exceeded"
        busy.close()  # the client goes away: the server stops that answer and frees the slot
    deadline = time.time() + 10
    while True:
        try:
            assert client.chat.completions.create(model="tiny-chat", messages=HISTORY, max_tokens=2).choices
            break
        except openai.RateLimitError:
            assert time.time() < deadline, "the slot of the abandoned stream was never freed"
            time.sleep(0.2)


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


@pytest.mark.parametrize("flags, message", [
    (dict(api_max_tokens=0), "--api_max_tokens must be at least 1"),
    (dict(api_max_input_tokens=-1), "--api_max_input_tokens must be at least 0"),
    (dict(chat_template="no_such_template"), "no_such_template"),
])
def test_bad_api_and_chat_flags_are_one_line_before_serving(tiny_model, monkeypatch, flags, message):
    monkeypatch.setattr(generate, "launch", lambda *a, **k: pytest.fail("the server must not start"))
    with pytest.raises(UserError, match=message):
        generate.main(base_model=str(tiny_model), api=True, **flags)
