"""generate.py's Gradio demo: an Instruction tab and a Chat tab streaming from one Generator, a Stop that ends only
its own user's answer, and the launch (with the OpenAI-compatible /v1 routes of utils.api when asked)."""

import re
import sys
import threading
import traceback
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Optional

from utils.cli import UserError
from utils.prompts import Prompter

# What beam search costs, next to its slider (benchmarks/results/generate-cpu-2core.json: 4 beams, stream off,
# against a streamed answer).
BEAMS_COST = ("Beam search needs Stream off (streaming uses 1 beam) and shows nothing until the answer is complete: "
              "4 beams take about 2.5x as long as a streamed answer takes to finish")
# The shared pool's size (utils.serving.Engine): answers generated together, sharing each forward pass (more make
# each step slower; benchmarks/bench_serving.py), and requests that may wait beyond them (Ollama's default).
MAX_RUNNING = 16
MAX_WAITING = 512
EXAMPLES = [  # the original's test prompts, one click away
    ["Tell me about alpacas.", ""],
    ["Write a Python program that prints the first 10 Fibonacci numbers.", ""],
    ["Write a program that prints the numbers from 1 to 100. But for multiples of three print 'Fizz' instead of the "
     "number and for the multiples of five print 'Buzz'. For numbers which are multiples of both three and five "
     "print 'FizzBuzz'.", ""],
    ["Translate the sentence into Spanish.", "I have no mouth but I must scream."],
    ["Tell me about the president of Mexico in 2019.", ""],
    ["Tell me about the king of France in 2019.", ""],
]


class SessionStops:
    """The stop events of the generations running for each browser session: Stop ends only its own user's."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: dict[Optional[str], set[threading.Event]] = defaultdict(set)

    @contextmanager
    def register(self, session: Optional[str]) -> Iterator[threading.Event]:
        event = threading.Event()
        with self.lock:
            self.events[session].add(event)
        try:
            yield event
        finally:
            with self.lock:
                self.events[session].discard(event)
                if not self.events[session]:
                    del self.events[session]

    def stop(self, session: Optional[str]) -> None:
        with self.lock:
            for event in self.events.get(session, ()):
                event.set()


def make_answer_fn(generator, stops: SessionStops, engine):
    """The demo's event handler: yields the growing answer (response part only), or raises a visible gr.Error."""
    import gradio as gr

    from utils.generation import Settings

    def answer(instruction: str, input: str, temperature: float, top_p: float, top_k: int, num_beams: int,
               max_new_tokens: int, stream: bool, model: str = "", request: gr.Request = None) -> Iterator[str]:
        if not (instruction or "").strip():
            raise gr.Error("Type an instruction first.", print_exception=False)
        served = chosen(generator, model)
        prompter = served.prompter if served else generator.prompter
        yield from answer_for(engine, stops, request, lambda: generator.render(instruction, input, prompter),
                              Settings(temperature, top_p, top_k, num_beams, max_new_tokens), stream,
                              cut=lambda text: first_answer(text, prompter), adapter=served and served.adapter)

    return answer


def chosen(generator, model: str):
    """The served model (utils.adapters.Served) picked in the selector; None with one model served."""
    from utils.adapters import default_model

    if not generator.served:
        return None
    return generator.served.get(model) or default_model(generator.served)


def answer_for(engine, stops: SessionStops, request, render, settings, stream: bool, cut,
               adapter: Optional[str] = None) -> Iterator[str]:
    """One request's answer as a handler yields it, growing when streamed: `render()` builds the prompt, `cut(text)`
    gives (what to show, whether the answer ended); `engine` (utils.serving.Engine) generates it in the shared pool,
    with `adapter` when several are served. Stop ends it for this session; errors (a full queue included) are this
    user's alone."""
    import gradio as gr

    try:
        prompt = render()
        settings = engine.generator.within_context(prompt, settings.checked())
        with stops.register(getattr(request, "session_hash", None)) as stop:
            if not stream:
                yield cut(engine.complete([prompt], settings, stop, adapter=adapter)[0].text)[0]
                return
            text = ""
            with engine.stream(prompt, settings, stop, adapter=adapter) as pieces:
                for piece in pieces:
                    text += piece
                    shown, ended = cut(text)
                    yield shown
                    if ended:  # leaving the stream stops the generation: no compute on unseen text
                        break
            if not text:  # an answer with no visible text (one token of whitespace) still replaces the last one
                yield ""
    except UserError as err:  # too long for the context, bad settings or conversation: this user's message only
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # e.g. out of GPU memory: tell this user, keep serving the others
        traceback.print_exc()
        raise gr.Error(f"Generation failed: {err}", print_exception=False) from None


def first_answer(text: str, prompter: Prompter) -> tuple[str, bool]:
    """The text before the model starts another section of the prompt template, and whether it did.

    A base model without an adapter rambles on past its answer with a new "### Response:" or "### Instruction:";
    the original demo cut its answers at the response marker, and this also cuts at a line that starts with another
    of the template's own headings. Any other heading ("### Example:") is part of the answer."""
    response, *headings = prompter.section_markers()
    pattern = "|".join([re.escape(response), *(rf"^[ \t]*{re.escape(h)}" for h in headings)])
    found = re.search(pattern, text, re.M)
    return (text[:found.start()].strip(), True) if found else (text.lstrip(), False)


def build_app(generator, defaults, stream: bool = True, title: str = "", concurrency_limit: int = MAX_RUNNING, chat=None,
              api=None, max_queue: int = MAX_WAITING):
    """The gr.Blocks demo: an Instruction tab (instruction + input, the original's controls, a streamed output, Stop,
    examples) and a Chat tab (a conversation rendered by `chat`, default: the tokenizer's template or alpaca_chat).

    Both tabs and the API answer from one pool (utils.serving.Engine, `app.engine`): `concurrency_limit` answers
    are generated at once, sharing each forward pass, and up to `max_queue` more wait their turn, first come first
    served; beyond that a request is turned away (the API's 503, the demo's "server is busy").

    API endpoints (gradio_client): /generate (instruction, input, temperature, top_p, top_k, num_beams,
    max_new_tokens, stream) streams the answer; /stop stops the calling session's answers; /chat (message,
    system prompt, the same settings) answers in the chat. With `api` (utils.api.ApiSettings), launch() also
    serves the OpenAI-compatible /v1 routes."""
    import gradio as gr

    from utils.chat import load_chat_template
    from utils.serving import engine_for

    chat = chat or load_chat_template("", generator.tokenizer)
    stops = SessionStops()
    engine = engine_for(generator, max_running=concurrency_limit, max_waiting=max_queue)
    if generator.compiled:  # compiled already (not pending): warm it up for the engine's calls now
        engine.warm_up()
    with gr.Blocks(title="Alpaca-LoRA", analytics_enabled=False) as app:
        gr.Markdown(f"# 🦙🌲 Alpaca-LoRA\n{title}: follows instructions and chats, answers stream as they are written.")
        with gr.Tab("Instruction"):
            with gr.Row():
                with gr.Column():
                    instruction = gr.Textbox(lines=2, label="Instruction", placeholder="Tell me about alpacas.", elem_id="instruction")
                    input = gr.Textbox(lines=2, label="Input", placeholder="none", elem_id="input")
                    with gr.Row():
                        submit = gr.Button("Submit", variant="primary", elem_id="submit")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    controls = (settings_controls(gr, defaults, stream, generator.context_length)
                                + model_selector(gr, generator))
                with gr.Column():
                    output = gr.Textbox(lines=14, label="Output", elem_id="output", buttons=["copy"], autoscroll=True)
            gr.Examples(EXAMPLES, inputs=[instruction, input], label="Examples (click one, then Submit)")

            event = gr.on(
                [submit.click, instruction.submit], make_answer_fn(generator, stops, engine),
                inputs=[instruction, input, *controls], outputs=output, api_name="generate",
            )

        def stop_session(request: gr.Request) -> None:
            stops.stop(getattr(request, "session_hash", None))

        # Stop sets this session's events (generation ends after the current token) and drops its queued requests.
        stop.click(stop_session, None, None, cancels=[event], queue=False, api_name="stop")
        with gr.Tab("Chat"):
            chat_tab(gr, generator, chat, defaults, stream, stops, stop_session, engine)
    if api is not None:  # the OpenAI-compatible routes, made by launch() which knows the credentials
        from utils.api import build_router

        app.openai_routes = lambda credentials: build_router(generator, chat, defaults, api, credentials, engine).routes
    app.engine = engine
    if generator.compile_pending:  # after the page is built: it answers at once, uncompiled until the step is ready
        engine.compile_in_background()
    # Gradio's queue only hands the tabs' requests to the engine, whose queue is the one that orders them.
    return app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)


def chat_tab(gr, generator, chat, defaults, stream: bool, stops: SessionStops, stop_session, engine) -> None:
    """A conversation with history: a system prompt box, the same settings, the answers streamed into the chat."""
    from utils.chat import chat_messages
    from utils.generation import Settings

    def respond(message: str, history: list, system: str, temperature: float, top_p: float, top_k: int,
                num_beams: int, max_new_tokens: int, stream: bool, model: str = "",
                request: gr.Request = None) -> Iterator[str]:
        if not (message or "").strip():
            raise gr.Error("Type a message first.", print_exception=False)
        served = chosen(generator, model)
        template = served.chat if served else chat
        yield from answer_for(engine, stops, request,
                              lambda: generator.render_chat(template, chat_messages(system, history, message)),
                              Settings(temperature, top_p, top_k, num_beams, max_new_tokens), stream,
                              cut=lambda text: (text.strip(), False), adapter=served and served.adapter)

    system = gr.Textbox(lines=1, label="System prompt", elem_id="system",
                        placeholder="empty: the chat template's default" + (f" ({chat.name})" if chat.name else ""))
    with gr.Accordion("Generation settings", open=False):
        controls = settings_controls(gr, defaults, stream, generator.context_length) + model_selector(gr, generator)
    message = gr.Textbox(placeholder="Type a message...", show_label=False, container=False, scale=7, elem_id="message",
                         submit_btn=True, stop_btn=True)  # ChatInterface's own box, with an id to find it by
    ui = gr.ChatInterface(respond, textbox=message, additional_inputs=[system, *controls], api_name="chat", fill_height=False)
    # The chat's own Stop button also ends the running generation (not only the event that streams it).
    ui.textbox.stop(stop_session, None, None, queue=False, api_visibility="undocumented")


def settings_controls(gr, defaults, stream: bool, context_length: Optional[int]) -> list:
    """Sliders with the original's defaults and ranges, and the stream switch."""
    longest = min(2000, context_length or 2000)
    return [
        gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature", info="0: no sampling (greedy or beam search)"),
        gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top p"),
        gr.Slider(0, 100, value=defaults.top_k, step=1, label="Top k", info="0: no limit"),
        gr.Slider(1, 4, value=min(defaults.num_beams, 4), step=1, label="Beams", info=BEAMS_COST),
        gr.Slider(1, longest, value=min(defaults.max_new_tokens, longest), step=1, label="Max new tokens"),
        gr.Checkbox(value=stream, label="Stream output", info="Show the answer token by token (with 1 beam)"),
    ]


def model_selector(gr, generator) -> list:
    """With several models served (--lora_weights NAME=PATH): a choice among them, the first adapter by default,
    each prompted with its own template; with one, nothing."""
    from utils.adapters import default_model

    if not generator.served:
        return []
    choices = [(f"{m.name} ({m.prompter.name} template)", m.name) for m in generator.served.values()]
    return [gr.Dropdown(choices, value=default_model(generator.served).name, label="Model", elem_id="model",
                        info="The base or one of its adapters: each is prompted with the template it was trained with")]


def check_port_free(server_name: str, server_port: int) -> None:
    """A busy port or an unknown interface, found before the model loads (Gradio would only say so afterwards)."""
    import socket

    try:
        family = socket.getaddrinfo(server_name, server_port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
            sock.bind((server_name, server_port))
    except OSError as err:
        raise UserError(f"cannot serve on {server_name}:{server_port} ({err.strerror or err}); "
                        "pass another --server_port (or --server_name)") from None


def launch(app, server_name: str, server_port: int, share: bool, auth, block: bool = True):
    """Start the server (with the OpenAI-compatible routes when build_app got `api`, behind the same `auth`);
    a busy port is a one-line error, not a traceback."""
    make_routes = getattr(app, "openai_routes", None)
    routes = make_routes(auth) if make_routes else None
    if routes:
        print(f"OpenAI-compatible API at http://{server_name}:{server_port}/v1 (/v1/chat/completions, /v1/models)",
              file=sys.stderr, flush=True)
    try:
        # quiet: Gradio's own banner tells users to `set share=True in launch()`; this project's flag is --share_gradio.
        # _frontend=False: no check that the page answers within 3 s (a Colab test), which fails when clients
        # arrive with the server (200 at once) and made it exit.
        result = app.launch(server_name=server_name, server_port=server_port, share=share, auth=auth, quiet=True,
                            prevent_thread_lock=True, footer_links=["api", "gradio"], _frontend=False,
                            app_kwargs={"routes": routes} if routes else None)
    except OSError as err:
        raise UserError(f"cannot serve on {server_name}:{server_port} ({err}); pass another --server_port") from None
    print(f"Running on {app.local_url}" + (f" and {app.share_url}" if app.share_url else ""), file=sys.stderr, flush=True)
    if block:
        app.block_thread()
    return result
