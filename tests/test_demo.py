"""generate.py's demo, live: its API driven with gradio_client and its page driven in headless Chromium.

Every server here listens on 127.0.0.1 only. The tiny random model answers through gen_helpers.answering, so
each answer is known in advance ("You asked: <instruction>") and `slowed` makes the streaming observable."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from gen_helpers import ARTIFACTS, REPO, answering, free_port, hold_back_inductor, make_adapter, serving, slowed

from utils import demo
from utils.generation import Settings, load_generator
from utils.prompts import Prompter

DEFAULTS = Settings(temperature=0, num_beams=1, max_new_tokens=100)


def echo(prompt: str) -> str:
    """The scripted answer: it quotes the (last) instruction, so every request can tell its answer from another's."""
    return "You asked: " + re.findall(r"### Instruction:\n(.*?)\n\n###", prompt, re.S)[-1]


def ask(instruction, input="", temperature=0, top_p=0.75, top_k=40, num_beams=1, max_new_tokens=100, stream=True):
    """The /generate endpoint's positional arguments."""
    return (instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens, stream)


@pytest.fixture(scope="module")
def gen(tiny_model, tmp_path_factory):
    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))
    return load_generator(str(tiny_model), str(adapter), device="cpu")


@pytest.fixture(scope="module")
def runs(gen):
    """Every generation of this module's model answers `echo`; the list records them."""
    with answering(gen.model, gen.tokenizer, echo) as runs:
        yield runs


@pytest.fixture(scope="module")
def url(gen, runs):
    """The demo (default concurrency limit) serving the tiny model + adapter."""
    with serving(demo.build_app(gen, DEFAULTS, title="tiny")) as url:
        yield url


def client(url, **kwargs):
    from gradio_client import Client

    return Client(url, verbose=False, **kwargs)


def run_of(runs, instruction: str) -> dict:
    [run] = [r for r in runs if f"Instruction:\n{instruction}\n" in r["prompt"]]
    return run


# --- the API ---------------------------------------------------------------------------------------------------

def test_partials_grow_and_the_final_is_the_response_only(gen, url, runs):
    job = client(url).submit(*ask("Tell me about alpacas."), api_name="/generate")
    with slowed(gen.model, 0.02):
        partials = list(job)
    assert job.outputs()[-1] == "You asked: Tell me about alpacas."  # no prompt, no template, no EOS
    distinct = [p for i, p in enumerate(partials) if p and p != partials[i - 1]]
    assert len(distinct) >= 5, partials  # token by token, not one block at the end
    assert all(b.startswith(a) for a, b in zip(distinct, distinct[1:])), distinct
    assert run_of(runs, "Tell me about alpacas.")["rows"] == 1


def test_stream_off_uses_the_beams_and_answers_in_one_piece(url, runs):
    job = client(url).submit(*ask("Name three animals.", num_beams=4, stream=False), api_name="/generate")
    assert job.result(timeout=30) == "You asked: Name three animals."
    assert job.outputs() == ["You asked: Name three animals."]
    assert run_of(runs, "Name three animals.")["rows"] == 4  # beam search really ran with 4 beams


def test_streaming_ignores_beams(url, runs):
    assert client(url).predict(*ask("Count to three.", num_beams=4), api_name="/generate") == "You asked: Count to three."
    assert run_of(runs, "Count to three.")["rows"] == 1


def test_input_reaches_the_prompt(url, runs):
    answer = client(url).predict(*ask("Translate the sentence.", "I like llamas."), api_name="/generate")
    assert answer == "You asked: Translate the sentence."
    assert "### Input:\nI like llamas." in run_of(runs, "Translate the sentence.")["prompt"]


@pytest.mark.parametrize("header", ["### Response:", "### Instruction:"])
def test_answer_ends_where_the_model_starts_another_section(gen, url, header):
    """A base model without an adapter rambles on in new sections of the template; the demo shows the answer and
    stops there."""
    rambling = f"Alpacas are gentle.\n\n{header}\nAlpacas are gentle.\n\n{header}\nAlpacas are gentle."
    with answering(gen.model, gen.tokenizer, lambda prompt: rambling) as runs:
        for stream in (True, False):
            assert client(url).predict(*ask("Describe alpacas.", stream=stream), api_name="/generate") == "Alpacas are gentle."
    streamed = runs[0]
    assert streamed["steps"] < len(streamed["script"]) - 10  # the generation was stopped, not just hidden


@pytest.mark.parametrize("text, expected", [
    ("Alpacas are gentle.", ("Alpacas are gentle.", False)),
    ("Alpacas.\n### Resp", ("Alpacas.\n### Resp", False)),  # not yet a header: shown while streaming
    ("Alpacas.\n### Response:", ("Alpacas.", True)),
    ("Alpacas.\n\n### Input:\nx", ("Alpacas.", True)),
    ("### Step 1: shear\nthe alpaca", ("### Step 1: shear\nthe alpaca", False)),  # a markdown heading stays
    ("Steps:\n\n### Example:\nx = 1\n", ("Steps:\n\n### Example:\nx = 1\n", False)),  # not one of alpaca's sections
    ("Alpacas.\n\n### Instruction:\nNow llamas.", ("Alpacas.", True)),
])
def test_first_answer(text, expected):
    assert demo.first_answer(text, Prompter("alpaca")) == expected


def test_first_answer_cuts_at_the_templates_own_sections():
    """vigogne's sections are French: its "### Réponse:" and "### Entrée:" end an answer, alpaca's "### Response:" does not."""
    vigogne = Prompter("vigogne")
    assert demo.first_answer("Oui.\n### Réponse:\nNon.", vigogne) == ("Oui.", True)
    assert demo.first_answer("Oui.\n\n### Entrée:\nx", vigogne) == ("Oui.", True)
    assert demo.first_answer("Oui.\n### Response:\nNo.", vigogne) == ("Oui.\n### Response:\nNo.", False)


def test_a_heading_in_the_answer_does_not_end_it(gen, url):
    """A model that writes its own Markdown section keeps the rest of its answer, streamed or not."""
    answer = "Use a loop.\n\n### Example:\nfor i in range(3):\n    print(i)"
    with answering(gen.model, gen.tokenizer, lambda prompt: answer):
        for stream in (True, False):
            assert client(url).predict(*ask("Show a loop.", stream=stream), api_name="/generate") == answer


def test_stop_ends_only_the_calling_sessions_answer(gen, url, runs):
    long = "Tell me everything about alpacas, llamas, vicunas and guanacos in the Andes mountains."
    alice, bob = client(url), client(url)
    with slowed(gen.model, 0.03):
        jobs = [alice.submit(*ask(long), api_name="/generate"), bob.submit(*ask(long + " Please."), api_name="/generate")]
        deadline = time.time() + 20
        while not all(job.outputs() for job in jobs) and time.time() < deadline:  # both are streaming
            time.sleep(0.02)
        alice.predict(api_name="/stop")
        stopped = jobs[0].result(timeout=10)
        stopped_at = run_of(runs, long)["steps"]
        assert jobs[1].result(timeout=30) == f"You asked: {long} Please."
    assert "You asked: ".startswith(stopped) or stopped.startswith("You asked: "), stopped
    assert len(stopped) < len(f"You asked: {long}") - 20  # cut short
    run = run_of(runs, long)
    assert run["steps"] <= stopped_at + 1 < len(run["script"])  # and its generation ended, freeing the model
    assert alice.predict(*ask("Still there?"), api_name="/generate") == "You asked: Still there?"  # stop is not sticky


# Each slider at its minimum, its maximum and a whole number, as a browser sends them: whole numbers as ints (1, not
# 1.0), the rest as floats; 40.0 for Top k is the float a slider may send for a whole step.
SLIDER_VALUES = [("temperature", v) for v in (0, 0.05, 1, 2)] + [("top_p", v) for v in (0.05, 0.5, 1)] + \
    [("top_k", v) for v in (0, 40.0, 100)] + [("num_beams", v) for v in (1, 2, 4)] + \
    [("max_new_tokens", v) for v in (1, 50, 512)]  # 512: the tiny model's whole context, the slider's maximum


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("name, value", SLIDER_VALUES)
def test_every_slider_value_answers(url, runs, name, value, stream):
    """The Instruction tab answers at every value its sliders offer, streamed or not (beam search when not)."""
    instruction = f"Slider {name} at {value}, stream {stream}."
    expected = f"You asked: {instruction}"
    answer = client(url).predict(*ask(instruction, **{name: value, "stream": stream}), api_name="/generate")
    if (name, value) == ("max_new_tokens", 1):
        assert answer is not None and expected.startswith(answer), answer  # one token of it (maybe a space)
    else:
        assert answer == expected


@pytest.mark.parametrize("name, value", [("temperature", 1), ("temperature", 2), ("top_p", 1), ("max_new_tokens", 512)])
def test_the_chat_tab_answers_at_the_sliders_ends(gen, url, name, value):
    settings = dict(temperature=0, top_p=0.75, top_k=40, num_beams=1, max_new_tokens=32, stream=True) | {name: value}
    with answering(gen.model, gen.tokenizer, lambda prompt: "Hello there."):
        assert client(url).predict("Hi.", "", *settings.values(), api_name="/chat") == "Hello there."


def test_the_demo_answers_while_its_decoding_step_compiles(tiny_model, monkeypatch):
    """generate.py's default on CPU: the page answers before the compiled step is ready (inductor is held back here),
    and after the switch the same greedy answer comes through the compiled step."""
    reached, go = hold_back_inductor(monkeypatch)

    compiling = load_generator(str(tiny_model), device="cpu", compile=True, compile_in_background=True)
    app = demo.build_app(compiling, DEFAULTS, title="tiny")
    with serving(app) as url:
        assert reached.wait(120), "the compiler never started"
        [compiler] = [thread for thread in threading.enumerate() if thread.name == "compile"]
        assert os.getpriority(os.PRIO_PROCESS, compiler.native_id) == 19  # the lowest: decoding keeps the cores
        during = client(url).predict(*ask("Tell me about alpacas.", max_new_tokens=12), api_name="/generate")
        assert not compiling.compiled  # answered while inductor waits
        go.set()
        deadline = time.time() + 300
        while not compiling.compiled:
            assert time.time() < deadline, "the compiled step never came into use"
            time.sleep(0.1)
        after = client(url).predict(*ask("Tell me about alpacas.", max_new_tokens=12), api_name="/generate")
    assert during and after == during


def test_the_page_says_what_beam_search_costs(gen):
    app = demo.build_app(gen, DEFAULTS, title="tiny")
    beams = [c["props"] for c in app.config["components"] if c.get("props", {}).get("label") == "Beams"]
    assert len(beams) == 2 and all(b["info"] == demo.BEAMS_COST for b in beams)  # the Instruction and Chat tabs
    assert "Stream off" in demo.BEAMS_COST and "2.5x as long" in demo.BEAMS_COST


def test_over_long_input_is_a_visible_error_and_the_server_keeps_serving(url):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"exceeds the model's 512-token context: shorten the instruction or input"):
        client(url).predict(*ask("Summarize this.", "word " * 2000), api_name="/generate")
    assert client(url).predict(*ask("And now?"), api_name="/generate") == "You asked: And now?"


@pytest.mark.parametrize("instruction", ["", "   \n"])
def test_empty_instruction_is_a_visible_error(url, instruction):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Type an instruction first"):
        client(url).predict(*ask(instruction), api_name="/generate")


def test_auth_is_enforced(gen, runs):
    with serving(demo.build_app(gen, DEFAULTS), auth=("alpaca", "pass:word")) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API is closed too, not just the login page
            urllib.request.urlopen(url + "config", timeout=10)
        assert refused.value.code == 401
        for wrong in (None, ("alpaca", "pass"), ("llama", "pass:word")):
            with pytest.raises(Exception):
                client(url, **({"auth": wrong} if wrong else {}))
        assert client(url, auth=("alpaca", "pass:word")).predict(*ask("Hi."), api_name="/generate") == "You asked: Hi."


def test_twenty_concurrent_clients_each_get_their_own_answer(gen, url, runs):
    """20 users at once, each gets their own answer; those running at the same time share forward passes (batched
    decoding), never more rows than the default concurrency limit, the others queued."""
    from utils.demo import MAX_RUNNING
    from utils.generation import unwrapped

    instructions = [f"Question {i}: what is {i} times {i}?" for i in range(20)]
    answers, errors, rows = {}, [], []

    def user(instruction):
        try:
            answers[instruction] = client(url).submit(*ask(instruction), api_name="/generate").result(timeout=60)
        except Exception as err:  # reported below, with the others
            errors.append(repr(err))

    hook = unwrapped(gen.model).register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with slowed(gen.model, 0.01):  # slow steps, so that requests arrive while others run
            threads = [threading.Thread(target=user, args=(i,)) for i in instructions]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=90)
    finally:
        hook.remove()
    assert not errors, errors
    assert answers == {i: f"You asked: {i}" for i in instructions}
    assert 1 < max(rows) <= MAX_RUNNING, f"at most {max(rows)} answers in one forward pass"


# --- a real browser --------------------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) driven by Playwright; skipped where either is missing (CI installs both)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.skip("no chromium on PATH (apt-get install chromium); never `playwright install` here")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def watch_output(page, done, timeout: float) -> list[str]:
    """The distinct non-empty values of the output box, polled until done(value) or the timeout."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        value = page.input_value("#output textarea")
        if value and (not seen or value != seen[-1]):
            seen.append(value)
        if done(value):
            break
        time.sleep(0.02)
    return seen


def test_browser_streams_the_answer_and_fills_examples(gen, url, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.fill("#instruction textarea", "Tell me about alpacas.")
    with slowed(gen.model, 0.1):
        page.click("#submit")
        seen = watch_output(page, lambda value: value == "You asked: Tell me about alpacas.", timeout=30)
    assert seen and seen[-1] == "You asked: Tell me about alpacas.", seen
    assert len(seen) >= 3, seen  # at least two different partials before the final: it streamed
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
    assert page.get_by_text(demo.BEAMS_COST).first.is_visible()  # what beam search costs, by its slider
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-tiny.png"), full_page=True)

    page.get_by_text("Translate the sentence into Spanish.").click()  # an example with an input
    page.wait_for_function("document.querySelector('#input textarea').value.length > 0", timeout=5000)
    assert page.input_value("#instruction textarea") == "Translate the sentence into Spanish."
    assert page.input_value("#input textarea") == "I have no mouth but I must scream."
    page.close()


def test_browser_answers_at_temperature_one_and_two(url, browser):
    """The slider's whole values, which the page sends as integers (transformers refuses an int temperature)."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    for value in ("1", "2"):
        temperature = page.get_by_label("number input for Temperature").first  # the Instruction tab's
        temperature.fill(value)
        temperature.press("Enter")
        page.fill("#instruction textarea", f"Answer at temperature {value}.")
        page.click("#submit")
        expected = f"You asked: Answer at temperature {value}."
        seen = watch_output(page, lambda text: text == expected or "rror" in text, timeout=30)
        assert seen and seen[-1] == expected, seen
    page.close()


def test_browser_chat_tab_streams_and_keeps_the_history(gen, url, runs, browser):
    """Two messages in the Chat tab: each answer streams into the chat, the second prompt holds the first exchange."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    page.fill("#system textarea", "Answer briefly.")
    bots = page.locator("[data-testid='bot']")
    for turn, message in enumerate(("Who are you?", "Tell me about alpacas.")):
        page.fill("#message textarea", message)
        seen, deadline = [], time.time() + 30
        with slowed(gen.model, 0.05):
            page.press("#message textarea", "Enter")
            while time.time() < deadline and (not seen or seen[-1] != f"You asked: {message}"):
                text = bots.nth(turn).inner_text() if bots.count() > turn else ""  # this turn's answer, as it grows
                if text.strip() and (not seen or text != seen[-1]):
                    seen.append(text)
                time.sleep(0.02)
        assert seen and seen[-1] == f"You asked: {message}", seen
        assert len(seen) >= 3 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen  # it streamed
    assert page.locator("[data-testid='user']").all_inner_texts() == ["Who are you?", "Tell me about alpacas."]
    assert page.locator("[data-testid='bot']").all_inner_texts() == ["You asked: Who are you?", "You asked: Tell me about alpacas."]
    second = runs[-1]["prompt"]  # what the model was given for the second answer: the whole conversation
    assert second.startswith("Answer briefly.") and second.endswith("### Instruction:\nTell me about alpacas.\n\n### Response:\n")
    assert "### Instruction:\nWho are you?\n\n### Response:\nYou asked: Who are you?" in second
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-tiny.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_python_generate_py_serves_the_embedded_model(browser, embedded_model):
    """`python generate.py` with no model flags: the embedded SmolLM2 streams an answer in the page.

    Its screenshot, test-artifacts/demo.png, is the README's docs/demo.png."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "generate.py", "--server_port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read() if server.poll() is not None else "timed out"
                time.sleep(1)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.fill("#instruction textarea", "Tell me about alpacas.")
        page.click("#submit")
        # Finished once the Submit event's progress indicator is gone from the output box.
        seen = watch_output(page, lambda value: value and not page.locator("#output .generating").count(), timeout=240)
        assert len(seen) >= 3, seen
        # The answer ends where the model starts another section of the prompt (utils.demo.first_answer); other
        # headings it writes ("### Explanation:") are part of the answer.
        assert "alpaca" in seen[-1].lower(), seen[-1]
        assert not any(marker in seen[-1] for marker in Prompter("alpaca").section_markers()), seen[-1]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
