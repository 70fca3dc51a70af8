"""A crowd on one server: N API clients at once against `python generate.py --api` with its default flags.

    python benchmarks/bench_serving.py                      # the embedded SmolLM2-135M: 1, 4, 16, 64, 200 clients
    python benchmarks/bench_serving.py --clients 1,16 --smoke   # a minute, on a tiny random model

Every client sends one streamed chat completion (greedy, max_tokens 16) at the same moment. Reported per crowd size:
how many were answered and how many turned away (HTTP 429/503) or failed, the time to first token and the total
latency (p50, p95), and the tokens/s of all answers together (tokens / time from the start to the last answer).
The server is generate.py itself (bench_generate.Server) on a free port; the machine's load average is recorded
next to each figure, as other work on a shared machine slows every figure. Writes
benchmarks/results/serving-<machine>.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.cli import UserError, run  # noqa: E402
import bench_generate  # noqa: E402  (this folder, where the script runs from)
from bench_generate import Server, Timer, smoke_model  # noqa: E402
from bench_train import cpu_model, machine_name  # noqa: E402

QUESTION = "Tell me about alpacas."
bench_generate.CONFIGS.setdefault("defaults", {})  # generate.py as a user starts it: no speed flags at all


def request(url: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion: its status, timings and token count."""
    import httpx

    timer, status = Timer(), None
    body = dict(model="bench", messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
    try:
        with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=None) as response:
            status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    for choice in event.get("choices", []):
                        timer.piece(choice["delta"].get("content") or "")
                    if event.get("usage"):
                        timer.tokens = event["usage"]["completion_tokens"]
    except Exception as err:  # noqa: BLE001 - counted as failed, the crowd goes on
        return dict(status=None, error=f"{type(err).__name__}: {err}")
    return dict(timer.result(), status=status, end=time.perf_counter())


def crowd(url: str, clients: int, max_tokens: int) -> dict:
    """`clients` requests started together, and what they got."""
    results, barrier = [None] * clients, threading.Barrier(clients)

    def one(i):
        barrier.wait()
        results[i] = request(url, max_tokens)

    load = os.getloadavg()[0]
    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [r for r in results if r["status"] == 200 and r.get("tokens")]
    tokens = sum(r["tokens"] for r in answered)
    return dict(
        clients=clients, answered=len(answered),
        turned_away=sum(r["status"] in (429, 503) for r in results),
        failed=clients - len(answered) - sum(r["status"] in (429, 503) for r in results),
        first_token_s=percentiles([r["first_token_s"] for r in answered]),
        total_s=percentiles([r["total_s"] for r in answered]),
        tokens=tokens,
        all_tokens_per_s=round(tokens / (max(r["end"] for r in answered) - started), 1) if answered else None,
        load_average=[round(load, 1), round(os.getloadavg()[0], 1)],
    )


def percentiles(values: list) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return dict(p50=None, p95=None)
    return dict(p50=round(statistics.median(values), 3), p95=round(values[min(len(values) - 1, int(0.95 * len(values)))], 3))


def isa_flags() -> list[str]:
    """The CPU's vector and matrix extensions, from lscpu (what decides its matmul speed)."""
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    line = next((l for l in flags.splitlines() if l.startswith("Flags:")), "")
    return sorted(f for f in line.split()[1:] if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))


def main(clients: str = "1,4,16,64,200", max_tokens: int = 16, smoke: bool = False, output: str = ""):
    """Crowds of API clients against one generate.py --api server; write JSON and print a table.

    Args:
        clients: Comma-separated crowd sizes, each sent at once.
        max_tokens: Each request's max_tokens.
        smoke: A tiny random model instead of the embedded one (checks the script, not the speed).
        output: The JSON file to write; default: benchmarks/results/serving-<machine>.json.
    """
    sizes = [c for c in clients.split(",") if c]
    if not sizes or not all(c.isdigit() and int(c) > 0 for c in sizes):
        raise UserError("--clients must be comma-separated whole numbers above 0, e.g. 1,4,16")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError("--max_tokens must be a whole number, at least 1")
    from utils.models import load_tokenizer, resolve_base_model

    base_model = smoke_model(Path(tempfile.gettempdir()) / "alpaca-lora-bench") if smoke else ""
    spec = dict(base_model=base_model, lora_weights="", max_new_tokens=max_tokens, threads=0)
    report = dict(machine=machine_name(False), cpu=cpu_model(), isa_flags=isa_flags(), cpus=os.cpu_count(),
                  date=time.strftime("%Y-%m-%d"), model=base_model or "SmolLM2-135M-Instruct (embedded)",
                  server="python generate.py --api (default flags)", max_tokens=max_tokens, crowds=[])
    output = Path(output or REPO / "benchmarks" / "results" / f"serving-{report['machine']}.json")
    server = Server("defaults", spec, load_tokenizer(resolve_base_model(base_model or None)))
    report["server_start_s"] = server.info["start_s"]
    try:
        for size in map(int, sizes):
            result = crowd(server.url, size, max_tokens)
            report["crowds"].append(result)
            print(json.dumps(result), flush=True)
            output.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        server.close()
    single = next((c["all_tokens_per_s"] for c in report["crowds"] if c["clients"] == 1), None)
    report["speedup_over_one_client"] = {c["clients"]: round(c["all_tokens_per_s"] / single, 2)
                                         for c in report["crowds"] if single and c["all_tokens_per_s"]}
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'clients':>8} {'answered':>9} {'away':>5} {'ttft p50/p95 s':>16} {'total p50/p95 s':>16} {'tok/s':>7}")
    for c in report["crowds"]:
        print(f"{c['clients']:>8} {c['answered']:>9} {c['turned_away']:>5} "
              f"{c['first_token_s']['p50']}/{c['first_token_s']['p95']:>7} {c['total_s']['p50']}/{c['total_s']['p95']:>7} "
              f"{c['all_tokens_per_s']:>7}")
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
