"""GGUF types compared in llama.cpp: file size, perplexity on held-out Alpaca-style records, and the answer to the
README's quick-start prompt against transformers' greedy answer on the merged model.

    python benchmarks/bench_gguf.py --lora_weights ./lora-alpaca --held_out seed_tasks.jsonl   # ~10 min on 2 cores

Held-out records: --held_out, a .json list of instruction/input/output records or Stanford Alpaca's
seed_tasks.jsonl (the 175 tasks Alpaca's data was generated from, none of them in the training sample); the first
--records of them, rendered with the alpaca template. Perplexity is over every token of each record, from llama.cpp's
own logits (logits_all). Writes benchmarks/results/gguf.json.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import INSTRUCTION, REPO, machine
from utils.cli import UserError, run

OUTTYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


def held_out_texts(path: Path, count: int) -> list[str]:
    """Records rendered as training renders them; a seed task's first instance is its input and output."""
    from utils.prompts import Prompter

    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
    records = [r["instances"][0] | r if "instances" in r else r for r in records[:count]]
    prompter = Prompter("alpaca")
    return [prompter.generate_prompt(r["instruction"], r["input"], r["output"]) for r in records]


def perplexity(llm, texts: list[str]) -> float:
    """exp(mean negative log-likelihood of every token after the first), from llama.cpp's logits."""
    total, count = 0.0, 0
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return float(np.exp(total / count))


def llama_answer(llm, prompt: str, tokens: int) -> list[int]:
    llm.reset()
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(out) == tokens:
            break
        out.append(token)
    return out


def hf_answer(base: str, lora_weights: str, prompt: str, tokens: int) -> list[int]:
    """transformers' greedy answer on the merged model in float32 (the reference every GGUF is held to)."""
    import torch

    from utils.export import load_merged
    from utils.models import load_tokenizer

    tokenizer, model = load_tokenizer(base), load_merged(base, lora_weights or None, torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]


def main(base_model: str = "", lora_weights: str = "", held_out: str = "", records: int = 40, tokens: int = 48,
         types: list = OUTTYPES, output: str = str(REPO / "benchmarks" / "results" / "gguf.json")):
    """Export base + adapter at each GGUF type and measure it in llama.cpp.

    Args:
        base_model: as export_gguf.py's; default: the embedded SmolLM2-135M-Instruct.
        lora_weights: adapter directory (finetune.py's output_dir); empty: the base alone.
        held_out: .json records or seed_tasks.jsonl not trained on; required.
        records: held-out seed tasks to compute perplexity on.
        tokens: greedy tokens of the quick-start answer to compare.
        types: GGUF types to measure.
        output: JSON file to write.
    """
    import llama_cpp

    import export_gguf
    from utils.models import load_tokenizer, resolve_base_model
    from utils.prompts import Prompter

    if not held_out or not Path(held_out).is_file():
        raise UserError(f"--held_out {held_out!r}: give a file of records the adapter was not trained on")
    base = resolve_base_model(base_model)
    texts = held_out_texts(Path(held_out), records)
    prompt = Prompter("alpaca").generate_prompt(INSTRUCTION)
    tokenizer = load_tokenizer(base)
    reference = hf_answer(base, lora_weights, prompt, tokens)
    results = {**machine("cpu", "cpus", "date"), "base_model": base_model or "embedded SmolLM2-135M-Instruct", "lora_weights": lora_weights,
               "held_out": f"first {records} of {Path(held_out).name}", "prompt": prompt,
               "transformers_answer": tokenizer.decode(reference),
               # the base alone, to tell the adapter's behaviour from the base's
               "transformers_base_answer": tokenizer.decode(hf_answer(base, "", prompt, tokens)), "types": {}}
    with tempfile.TemporaryDirectory() as folder:
        for outtype in types:
            path = Path(folder) / f"{outtype}.gguf"
            start = time.perf_counter()
            export_gguf.export(base_model, lora_weights, str(path), outtype)
            seconds = time.perf_counter() - start
            llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
            answer = llama_answer(llm, prompt, tokens)
            same = next((i for i, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference)))
            results["types"][outtype] = {
                "size_mib": round(path.stat().st_size / 2**20, 1), "export_s": round(seconds, 1),
                "perplexity": round(perplexity(llm, texts), 3), "answer": tokenizer.decode(answer),
                "same_leading_tokens_as_transformers": same, "answer_tokens": len(answer)}
            print(outtype, results["types"][outtype], flush=True)
            del llm
    Path(output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
