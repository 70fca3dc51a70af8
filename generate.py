"""Serve base model + LoRA adapter in a streaming Gradio demo, or answer instructions from the command line.

    python generate.py                                  # the embedded model at http://127.0.0.1:7860
    python generate.py --lora_weights ./lora-alpaca     # after finetune.py
    python generate.py --api --lora_weights en=./lora-en,fr=./lora-fr    # the base and two adapters in one process
    python generate.py --instruction "Tell me about alpacas."             # prints the answer, no server
    python generate.py --input_file questions.jsonl --output_file answers.jsonl
    python generate.py --api                            # + an OpenAI-compatible API at http://127.0.0.1:7860/v1
    python generate.py --backend llama.cpp --lora_weights ./lora-alpaca   # answers computed by llama.cpp (GGUF)
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from utils.cli import UserError, check_writable, run
from utils.demo import MAX_RUNNING, MAX_WAITING, build_app, check_port_free, first_answer, launch

AUTH_ENV = "ALPACA_LORA_AUTH"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(
    base_model: str = "",
    lora_weights: str = "",
    load_8bit: bool = False,
    load_4bit: bool = False,
    prompt_template: str = "",
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share_gradio: bool = False,
    auth: str = "",
    device: str = "auto",
    instruction: str = "",
    input: str = "",
    input_file: str = "",
    output_file: str = "",
    overwrite: bool = False,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    no_repeat_ngram_size: int = 3,
    stream: bool = True,
    batch_size: int = 8,
    concurrency_limit: int = MAX_RUNNING,
    max_queue: int = MAX_WAITING,
    chat_template: str = "",
    api: bool = False,
    api_max_tokens: int = 512,
    api_max_input_tokens: int = 0,
    bf16: Optional[bool] = None,
    compile: Optional[bool] = None,
    threads: int = 0,
    backend: str = "transformers",
    gguf_type: str = "",
):
    """Serve base model + LoRA adapter in a Gradio demo, or answer --instruction / --input_file without a server.

    Args:
        base_model: {BASE_MODEL}
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: the base model alone. NAME=PATH pairs, comma-separated (en=./lora-en,fr=./lora-fr): several adapters of one base served at once, the base too (by its own name); the API's `model` and the demo's selector pick one (default: the first adapter), and their requests share each forward pass.
        load_8bit: Load the base model in 8-bit (bitsandbytes; CUDA, or CPU slowly), as in the original.
        load_4bit: Load the base model in 4-bit NF4 (bitsandbytes): the least memory.
        prompt_template: A template in templates/ (alpaca, alpaca_legacy, alpaca_short, vigogne) or a .json path; default: the adapter's (its training_args.json), else alpaca.
        server_name: Interface the demo listens on; 127.0.0.1 keeps it on this machine, 0.0.0.0 exposes it (add --auth).
        server_port: Port of the demo.
        share_gradio: Also open a public *.gradio.live link (goes through Gradio's servers; add --auth).
        auth: user:password required to open the demo; empty: the ALPACA_LORA_AUTH environment variable, else none.
        device: auto (CUDA, then Apple MPS, then CPU) | cuda | cuda:N | mps | cpu.
        instruction: Answer this one instruction on stdout and exit (no server).
        input: Optional context for --instruction (the template's Input section).
        input_file: .json (a list) or .jsonl file of records with "instruction" (and optional "input"): answer them all and exit.
        output_file: Write the answers as JSON Lines (each record + "response") here instead of stdout; an existing file is refused unless --overwrite.
        overwrite: Let --output_file replace a file that exists.
        temperature: Sampling temperature; 0 means greedy or plain beam search (no sampling).
        top_p: Nucleus sampling: keep the smallest set of tokens whose probabilities add up to this.
        top_k: Sample among the k most likely tokens (0: no limit).
        num_beams: Beam search width for non-streamed answers; streaming always uses one beam.
        max_new_tokens: Longest answer, in tokens.
        no_repeat_ngram_size: Command-line answers (--instruction, --input_file) never repeat a run of this many tokens: a small model's answer, looping on one clause, ends instead of filling max_new_tokens. 0: the original's decoding. The demo, the API and --backend llama.cpp decode without it.
        stream: In the demo, stream answers token by token by default (the user can switch it off).
        batch_size: Instructions generated together in --input_file mode (left-padded batches).
        concurrency_limit: Answers generated at the same time, for the demo's tabs and the API together; they share each forward pass (batched decoding). Further requests wait in one first-come-first-served queue.
        max_queue: Requests that may wait beyond the running ones; past it the API answers 503 (with Retry-After) and the demo "server is busy".
        chat_template: How the Chat tab and the API render conversations: tokenizer (its own chat template), alpaca_chat or another template with user/assistant keys; default: the adapter's (finetune.py --chat_template; for an adapter trained on instruction records, its prompt template turn by turn), without an adapter the tokenizer's if it has one, else alpaca_chat.
        api: Also serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) on the same port, behind the same --auth (the password is the API key).
        api_max_tokens: The largest max_tokens an API request may ask for (larger: HTTP 400).
        api_max_input_tokens: The longest conversation an API request may send, in tokens (longer: HTTP 413); 0: the model's context length.
        bf16: bf16 weights (half the bytes to read per token); default: where the hardware computes bf16 natively (GPUs since Ampere, CPUs with AVX512-BF16 or AMX), else fp32 on CPU, fp16 on GPUs. False: fp32 on CPU, fp16 on GPUs.
        compile: Compile the decoding step (torch.compile) for 1.2x (fp32) to 1.8x (bf16) faster tokens on CPU while one answer is generated (several at once are decoded as one batch, uncompiled); The demo answers at once, uncompiled, while the step compiles in the background at the lowest CPU priority, in the time decoding leaves (a minute or more on 2 CPU cores; it says when the compiled step is in use); --instruction/--input_file compile it first. Default: on for the demo on CPU in bf16 (native bf16) where a C++ compiler (g++) is installed, off for --instruction/--input_file and on GPUs (not measured there).
        threads: CPU threads computing the model; 0: the physical cores, less one for the demo (streaming needs a core of its own).
        backend: transformers (batched decoding, beam search, GPUs, 8/4-bit) | llama.cpp: answers computed by llama.cpp (llama-cpp-python) from GGUF files at its own speed on CPU, the adapter applied at run time as a GGUF LoRA (exported once, cached); one answer at a time, the others queued; one beam; the same prompts, tokens and sampling as transformers (docs/serving.md).
        gguf_type: With --backend llama.cpp, the type the base is exported at, once (cached): f16, f32, bf16, q8_0, q4_k_m, …; empty: a .gguf base (the embedded model's Q4_1 included) as it is, any other base at f16.
    """
    from utils.checks import check_values

    check_values(locals())  # first, before the imports below take their seconds
    from utils.generation import Settings

    settings = Settings(temperature, top_p, top_k, num_beams, max_new_tokens, no_repeat_ngram_size).checked()
    quantization = pick_quantization_flag(load_8bit, load_4bit)
    batch_mode = bool(instruction or input_file)
    records = read_requests(instruction, input, input_file) if batch_mode else []
    if output_file:
        if Path(output_file).is_dir():
            raise UserError(f"--output_file {output_file} is a directory: name the file to write, e.g. answers.jsonl")
        if Path(output_file).exists() and not overwrite:
            raise UserError(f"--output_file {output_file} exists: pass --overwrite to replace it, or name another file")
        check_writable(str(Path(output_file).expanduser().absolute().parent), "output_file")
    credentials = None if batch_mode else parse_auth(auth or os.environ.get(AUTH_ENV, ""))
    from utils import adapters
    from utils.llamacpp import check_backend

    named = adapters.parse(lora_weights)
    adapters.check(named, batch_mode, backend, compile)
    backend = check_backend(backend, gguf_type, "" if named else lora_weights, device, load_8bit, load_4bit, bf16,
                            compile)
    if quantization != "none" and (bf16 or compile):
        raise UserError(f"--{'bf16' if bf16 else 'compile'} applies to unquantized weights: drop it or --load_{quantization}")
    if not batch_mode:
        check_port_free(server_name, server_port)
    chat_template = None if batch_mode else chat_template
    if backend == "llama.cpp":
        generator = load_llamacpp(base_model, lora_weights, prompt_template, chat_template, gguf_type, threads,
                                  batch_mode, settings.num_beams)
    else:
        generator = load_transformers(base_model, lora_weights, quantization, device, prompt_template, chat_template,
                                      bf16, compile, threads, batch_mode, several=bool(named))
    if batch_mode:
        answer_records(generator, records, settings, batch_size, output_file, plain=bool(instruction) and not output_file)
        return
    from utils.api import ApiSettings

    warn_if_exposed(server_name, share_gradio, credentials)
    base_model = generator.base_model
    title = f"{base_model or 'SmolLM2-135M-Instruct (embedded)'}" + (f" + {lora_weights}" if lora_weights else "")
    one_model = Path(lora_weights).name if lora_weights and not named else adapters.base_id(base_model)
    api_settings = ApiSettings(model=one_model, max_tokens=api_max_tokens,
                               max_input_tokens=api_max_input_tokens) if api else None
    app = build_app(generator, settings, stream=stream, title=title, concurrency_limit=concurrency_limit,
                    chat=generator.chat, api=api_settings, max_queue=max_queue)
    launch(app, server_name=server_name, server_port=server_port, share=share_gradio, auth=credentials)


def load_transformers(base_model: str, lora_weights: str, quantization: str, device: str, prompt_template: str,
                      chat_template: Optional[str], bf16: Optional[bool], compile: Optional[bool], threads: int,
                      batch_mode: bool, several: bool):
    import torch

    from utils.generation import compile_decoding, decoding_threads, load_generator
    from utils.models import pick_device, pick_dtype

    device = pick_device(device)
    if device == "cpu":
        torch.set_num_threads(threads or decoding_threads(serving=not batch_mode))
    dtype = pick_dtype(device, bf16) if quantization == "none" else None
    # By default only in bf16: in fp32 the compiled step's gain for one stream does not pay for what its compile in
    # the background costs a crowd at start (benchmarks/bench_serving.py --at_start, docs/performance.md). Never
    # with several adapters: each row picks its own (utils.adapters.rows), which a graph would bake in.
    compile = compile_decoding(compile, device == "cpu" and not batch_mode and quantization == "none"
                               and dtype == torch.bfloat16 and not several)
    return load_generator(base_model, lora_weights, quantization, device, prompt_template, chat_template=chat_template,
                          dtype=dtype, compile=compile, compile_in_background=not batch_mode)


def load_llamacpp(base_model: str, lora_weights: str, prompt_template: str, chat_template: Optional[str],
                  gguf_type: str, threads: int, batch_mode: bool, num_beams: int):
    import torch

    from utils.generation import decoding_threads
    from utils.llama_backend import load_llamacpp_generator

    # torch only samples one row of logits here: more threads would spin against llama.cpp's for the cores
    torch.set_num_threads(1)
    if num_beams > 1:
        print(f"llama.cpp decodes one beam: --num_beams {num_beams} is ignored (greedy at temperature 0, else sampled)",
              file=sys.stderr, flush=True)
    return load_llamacpp_generator(base_model, lora_weights, prompt_template, chat_template, gguf_type,
                                   threads or decoding_threads(serving=not batch_mode))


def pick_quantization_flag(load_8bit: bool, load_4bit: bool) -> str:
    if load_8bit and load_4bit:
        raise UserError("--load_8bit and --load_4bit exclude each other: pick one")
    return "8bit" if load_8bit else "4bit" if load_4bit else "none"


def parse_auth(value: str) -> Optional[tuple[str, str]]:
    """("user", "password") from "user:password" (the password may contain colons); None when empty."""
    if not value:
        return None
    user, sep, password = str(value).partition(":")
    if not (sep and user and password):
        raise UserError(f"--auth / ${AUTH_ENV} must look like user:password")
    return user, password


def warn_if_exposed(server_name: str, share: bool, credentials) -> None:
    """Exposing the demo is allowed, but never silently without a password."""
    if credentials is None and (share or server_name not in LOOPBACK):
        where = "through a public gradio.live link" if share else f"on {server_name}"
        print(f"warning: the demo is reachable {where} with no password; add --auth user:password "
              f"(or set ${AUTH_ENV})", file=sys.stderr, flush=True)


# --- the non-UI mode ---------------------------------------------------------------------------------------------

def read_requests(instruction: str, input: str, input_file: str) -> list[dict]:
    """The records to answer: one from --instruction/--input, or all of --input_file."""
    if instruction and input_file:
        raise UserError("give --instruction or --input_file, not both")
    if instruction:
        return [{"instruction": str(instruction), "input": str(input or "")}]
    from utils.data import read_instructions

    return read_instructions(input_file, "--input_file")


def answer_records(generator, records: list[dict], settings, batch_size: int, output_file: str, plain: bool) -> None:
    """Answer records in left-padded batches; write each record + "response" (or "error") as one JSON line.

    With `plain` (a single --instruction and no --output_file) print only the answer text."""
    from utils.generation import PromptTooLong

    with answers_output(output_file) as out:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            prompts = [generator.render(r["instruction"], r.get("input", "")) for r in batch]
            results: list[dict] = [{} for _ in batch]
            fitting = []
            for i, prompt in enumerate(prompts):
                try:
                    generator.check_length(generator.prompt_tokens(prompt), settings.max_new_tokens)
                    fitting.append(i)
                except PromptTooLong as err:
                    if plain:
                        raise
                    results[i] = {"error": str(err)}
            completions = generator.complete([prompts[i] for i in fitting], settings) if fitting else []
            for i, completion in zip(fitting, completions):
                results[i] = {"response": first_answer(completion.text, generator.prompter)[0]}
            for record, result in zip(batch, results):
                print(result["response"] if plain else json.dumps({**record, **result}, ensure_ascii=False), file=out, flush=True)
            if len(records) > 1:
                print(f"answered {min(start + batch_size, len(records))}/{len(records)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def answers_output(output_file: str):
    """stdout, or output_file written durably (utils.durable): a run that fails or is killed part way leaves the
    earlier file whole, and the next run removes what it left."""
    if not output_file:
        yield sys.stdout
        return
    from utils import durable

    target = Path(output_file)
    durable.sweep(target.parent, target.name)
    with durable.durable_file(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        yield out


if __name__ == "__main__":
    run(main)
