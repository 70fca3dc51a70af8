"""Several adapters on one base in one process (generate.py --lora_weights NAME=PATH,..., utils.adapters): requests
for two adapters and the base share forward passes and each gets its model's one-at-a-time answer; the API lists
the three and routes by `model` (OpenAI's 404 for an unknown one); the demo's selector switches the template; every
bad form of the flag fails in one line before any model loads."""

import json
import shutil
import threading

import httpx
import pytest
from families import make_family_model
from gen_helpers import make_adapter, never_eos, serving, slowed

import generate
from utils import demo, models
from utils.api import ApiSettings
from utils.cli import UserError
from utils.generation import Settings, load_generator, unwrapped
from utils.serving import Engine, rows_in_flight

GREEDY = Settings(temperature=0, num_beams=1, max_new_tokens=10)
QUESTION = "Tell me about alpacas."


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    """Two adapters of the tiny base with different random weights, as finetune.py records them: en trained on
    conversations (alpaca_chat), fr on instructions in alpaca_short."""
    en = make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "en", seed=1)
    fr = make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "fr", seed=2)
    records = {en: {"conversations": True, "chat_template": "alpaca_chat"}, fr: {"prompt_template_name": "alpaca_short"}}
    for adapter, record in records.items():
        (adapter / "training_args.json").write_text(json.dumps({"base_model": str(tiny_model), **record}))
    return en, fr


@pytest.fixture(scope="module")
def gen(tiny_model, pair):
    return load_generator(str(tiny_model), f"en={pair[0]},fr={pair[1]}", device="cpu", chat_template="")


@pytest.fixture(scope="module")
def lone(tiny_model, pair) -> dict:
    """Each model served alone, as generate.py serves one adapter (or none): what the shared server must equal."""
    return lone_generators(tiny_model, pair)


def lone_generators(base, pair) -> dict:
    paths = {base.name: "", "en": str(pair[0]), "fr": str(pair[1])}
    return {name: load_generator(str(base), path, device="cpu", chat_template="") for name, path in paths.items()}


def lone_answers(lone: dict, prompts: dict, settings=GREEDY) -> dict:
    """Each model's answer to its prompt from its lone generator, one request at a time, never ending at EOS (as the
    shared server's answers are made in these tests: full length, every token compared)."""
    answers = {}
    for name, prompt in prompts.items():
        with never_eos(lone[name].model, lone[name].tokenizer.eos_token_id):
            answers[name] = lone[name].complete([prompt], settings)[0].text
    return answers


def test_each_model_is_prompted_as_when_served_alone(tiny_model, gen, lone):
    """The base with the defaults, en with the chat template it was trained on, fr with alpaca_short: each served
    model renders instructions and conversations exactly as a server of that model alone does."""
    conversation = [{"role": "user", "content": QUESTION}]
    assert [(m.name, m.adapter, m.parent) for m in gen.served.values()] == [
        (tiny_model.name, "__base__", None), ("en", "en", tiny_model.name), ("fr", "fr", tiny_model.name)]
    for name, m in gen.served.items():
        assert gen.render(QUESTION, "", m.prompter) == lone[name].render(QUESTION), name
        assert m.chat.render(conversation, True) == lone[name].chat.render(conversation, True), name
    assert gen.served["fr"].prompter.name == "alpaca_short" and gen.served["en"].chat.name == "alpaca_chat"
    assert gen.default_adapter == "en" and not any(getattr(m, "merged", False) for m in gen.model.modules())


def test_overlapping_requests_for_two_adapters_and_the_base_share_passes(gen, lone):
    """Greedy requests for en, fr and the base started together (and a beam search for fr beside them): each answer
    equals its model's one-at-a-time answer, and the three models' rows were computed in the same forward passes."""
    prompts = {name: gen.render(QUESTION, "", m.prompter) for name, m in gen.served.items()}
    beams = Settings(temperature=0, num_beams=2, max_new_tokens=6)
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        alone = lone_answers(lone, prompts)
        alone_beams = lone_answers(lone, {"fr": prompts["fr"]}, beams)
        engine = Engine(gen, max_running=8, max_waiting=8)
        mixes = []
        counter = unwrapped(gen.model).register_forward_pre_hook(
            lambda module, args: mixes.append([job.adapter for job in rows_in_flight() or []]))
        with slowed(gen.model, 0.01):
            jobs = {name: engine.stream(prompts[name], GREEDY, adapter=m.adapter) for name, m in gen.served.items()}
            beam = engine.complete([prompts["fr"]], beams, adapter="fr")[0]
            got = {name: "".join(job) and job.completion.text for name, job in jobs.items()}
        counter.remove()
        engine.close()
    assert len(set(alone.values())) == 3  # the adapters really answer otherwise than each other and the base
    assert got == alone and beam.text == alone_beams["fr"]
    assert ["__base__", "en", "fr"] in [sorted(mix) for mix in mixes]  # one forward pass computed all three


@pytest.fixture(scope="module")
def url(gen):
    app = demo.build_app(gen, Settings(temperature=0, num_beams=1, max_new_tokens=8), chat=gen.chat,
                         api=ApiSettings(model="unused", max_tokens=64))
    with serving(app) as url:
        yield url


def test_models_lists_the_base_and_each_adapter_with_its_parent(tiny_model, url):
    listed = httpx.get(f"{url}v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["object"], m["parent"]) for m in listed["data"]] == [
        (tiny_model.name, "model", None), ("en", "model", tiny_model.name), ("fr", "model", tiny_model.name)]


def test_the_model_field_picks_the_adapter_and_an_unknown_one_is_a_404(gen, lone, url):
    messages = [{"role": "user", "content": QUESTION}]
    prompts = {name: g.render_chat(g.chat, messages) for name, g in lone.items()}
    alone = lone_answers(lone, prompts, Settings(temperature=0, num_beams=1, max_new_tokens=8))
    replies = {}

    def ask(name):
        body = {"messages": messages, "max_tokens": 8, "temperature": 0} | ({"model": name} if name else {})
        replies[name] = httpx.post(f"{url}v1/chat/completions", json=body, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(name,)) for name in [*prompts, ""]]
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert {name: r["choices"][0]["message"]["content"] for name, r in replies.items()} == alone | {"": alone["en"]}
    assert [replies[name]["model"] for name in prompts] == list(prompts) and replies[""]["model"] == "en"
    missing = httpx.post(f"{url}v1/chat/completions", json={"model": "de", "messages": messages})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "The model `de` does not exist.", "type": "invalid_request_error",
                                        "param": "model", "code": "model_not_found"}}


def test_the_demo_selector_switches_the_template_on_both_tabs(gen, url, monkeypatch):
    from gradio_client import Client

    seen, encode = [], gen.encode
    monkeypatch.setattr(gen, "encode", lambda prompts, *a, **k: (seen.extend(prompts), encode(prompts, *a, **k))[1])
    settings = (0, 0.75, 40, 1, 4, True)  # temperature, top_p, top_k, beams, max new tokens, stream
    client = Client(url, verbose=False)
    client.predict(QUESTION, "", *settings, "fr", api_name="/generate")
    client.predict(QUESTION, "", *settings, api_name="/generate")  # the selector's default: the first adapter
    client.predict(QUESTION, "", *settings, "fr", api_name="/chat")  # message, system prompt, settings, model
    conversation = [{"role": "user", "content": QUESTION}]
    assert seen == [gen.render(QUESTION, "", gen.served[name].prompter) for name in ("fr", "en")] + [
        gen.render_chat(gen.served["fr"].chat, conversation)]
    assert seen[0] != seen[1]


def test_a_bare_path_still_serves_one_adapter_under_any_name(tiny_model, pair, monkeypatch):
    seen = {}
    monkeypatch.setattr(generate, "launch", lambda app, **kwargs: seen.update(app=app))
    generate.main(base_model=str(tiny_model), lora_weights=str(pair[0]), api=True, compile=False)
    with serving(seen["app"]) as url:
        assert [m["id"] for m in httpx.get(f"{url}v1/models").json()["data"]] == ["en"]
        reply = httpx.post(f"{url}v1/chat/completions", timeout=60, json={
            "model": "gpt-4o", "max_tokens": 2, "messages": [{"role": "user", "content": QUESTION}]})
    assert reply.status_code == 200 and reply.json()["model"] == "en"


@pytest.fixture
def other_adapters(tiny_model, pair, tmp_path):
    """Adapters that cannot join en: a DoRA one, one trained on another base, a folder that is not an adapter."""
    dora = make_adapter(tiny_model, tmp_path / "dora", use_dora=True)
    elsewhere = shutil.copytree(pair[1], tmp_path / "elsewhere")
    (elsewhere / "training_args.json").write_text(json.dumps({"base_model": "/elsewhere/llama-7b"}))
    (tmp_path / "empty").mkdir()
    return dict(dora=dora, elsewhere=elsewhere, empty=tmp_path / "empty")


@pytest.mark.parametrize("form, flags, message", [
    ("en={en},fr", {}, "'fr' is not NAME=PATH; write e.g. en=./lora-en,fr=./lora-fr"),
    ("en={en},=x", {}, "'=x' is not NAME=PATH"),
    ("e.n={en}", {}, "adapter name 'e.n' is not a model id"),
    ("en={en},en={fr}", {}, "--lora_weights names en twice"),
    ("en={en},de=./no-such-lora", {}, "adapter directory ./no-such-lora not found"),
    ("en={en},de={empty}", {}, "has no adapter_config.json"),
    ("en={en},de={dora}", {}, "adapter de ({dora}) is DoRA"),
    ("en={en},de={elsewhere}", {}, "adapter de ({elsewhere}) was trained on /elsewhere/llama-7b"),
    ("{base}={en}", {}, "adapter name {base} is the base model's own id"),
    ("en={en},fr={fr}", dict(instruction="Hi."), "--instruction/--input_file answer with one adapter"),
    ("en={en},fr={fr}", dict(backend="llama.cpp"), "--backend llama.cpp applies one GGUF LoRA per process"),
    ("en={en},fr={fr}", dict(compile=True), "drop --compile"),
])
def test_every_bad_form_is_one_line_before_any_model_loads(tiny_model, pair, other_adapters, monkeypatch, form, flags,
                                                           message):
    paths = dict(en=pair[0], fr=pair[1], base=tiny_model.name, **other_adapters)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    monkeypatch.setattr(generate, "launch", lambda *a, **k: pytest.fail("the server must not start"))
    with pytest.raises(UserError) as caught:
        generate.main(base_model=str(tiny_model), lora_weights=form.format(**paths), api=True, **flags)
    assert message.format(**paths) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_mixed_adapter_rows_on_families(family, tmp_path):
    """Llama 3 and Gemma 3 (sliding-window layers, windows shorter than the prompt): two adapters and the base in
    one batch answer as each does alone."""
    base = make_family_model(tmp_path / family, family)
    pair = (make_adapter(base, tmp_path / "en", seed=1), make_adapter(base, tmp_path / "fr", seed=2))
    generator = load_generator(str(base), f"en={pair[0]},fr={pair[1]}", device="cpu")
    prompts = {name: generator.render(QUESTION, "", m.prompter) for name, m in generator.served.items()}
    with never_eos(generator.model, generator.tokenizer.eos_token_id):
        alone = lone_answers(lone_generators(base, pair), prompts)
        engine = Engine(generator, max_running=4, max_waiting=4)
        with slowed(generator.model, 0.01):
            jobs = {name: engine.stream(prompts[name], GREEDY, adapter=m.adapter)
                    for name, m in generator.served.items()}
            got = {name: "".join(job) and job.completion.text for name, job in jobs.items()}
        engine.close()
    assert min(generator.prompt_tokens(p) for p in prompts.values()) > 8  # longer than the windows
    assert got == alone, family
