"""A crowd on one server: N API clients at once against `python generate.py --api` with its default flags.

    python benchmarks/bench_serving.py                      # the embedded SmolLM2-135M: 1, 4, 16, 64, 200 clients
    python benchmarks/bench_serving.py --clients 1,16 --smoke   # a minute, on a tiny random model

Every client sends one streamed chat completion (greedy, max_tokens 16) at the same moment. Reported per crowd size:
how many were answered and how many turned away (HTTP 429/503) or failed, the time to first token and the total
latency (p50, p95), and the tokens/s of all answers together (tokens / time from the start to the last answer).
The server is generate.py itself on a free port, once its compiled step is in use; the machine's load average is
recorded next to each figure, as other work on a shared machine slows every figure. Writes
benchmarks/results/serving-<machine>.json.
"""

import json
from pathlib import Path

from common import REPO, Server, at_once, chat, machine, percentiles, smoke_model, with_load, write
from utils.cli import UserError, run


def request(url: str, max_tokens: int) -> dict:
    """One greedy answer, or the status that refused it (None: it failed): a crowd goes on either way."""
    import httpx

    try:
        return dict(chat(url, max_tokens, temperature=0), status=200)
    except httpx.HTTPStatusError as err:
        return dict(status=err.response.status_code)
    except Exception as err:  # noqa: BLE001 - counted as failed
        return dict(status=None, error=f"{type(err).__name__}: {err}")


def crowd(url: str, clients: int, max_tokens: int) -> dict:
    """`clients` requests started together, and what they got."""
    results, started = at_once(lambda: request(url, max_tokens), clients)
    answered = [r for r in results if r["status"] == 200 and r.get("tokens")]
    turned_away = sum(r["status"] in (429, 503) for r in results)
    tokens = sum(r["tokens"] for r in answered)
    return dict(
        clients=clients, answered=len(answered), turned_away=turned_away,
        failed=clients - len(answered) - turned_away,
        first_token_s=percentiles([r["first_token_s"] for r in answered]),
        total_s=percentiles([r["total_s"] for r in answered]),
        tokens=tokens,
        all_tokens_per_s=round(tokens / (max(r["end"] for r in answered) - started), 1) if answered else None)


def main(clients: str = "1,4,16,64,200", max_tokens: int = 16, smoke: bool = False, output: str = ""):
    """Crowds of API clients against one generate.py --api server; write JSON.

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
    base_model = smoke_model() if smoke else ""
    report = dict(machine("machine", "cpu", "isa_flags", "cpus", "date"),
                  model=base_model or "SmolLM2-135M-Instruct (embedded)",
                  server="python generate.py --api (default flags)", max_tokens=max_tokens, crowds=[])
    output = Path(output or REPO / "benchmarks" / "results" / f"serving-{report['machine']}.json")
    server = Server(dict(base_model=base_model))
    try:
        report["server_start_s"] = server.wait_for_page()
        server.compiled()
        chat(server.url, 2, temperature=0)  # the server's first-request work done before any crowd
        for size in map(int, sizes):
            report["crowds"].append(with_load(lambda: crowd(server.url, size, max_tokens)))
            print(json.dumps(report["crowds"][-1]), flush=True)
            write(output, report)
    finally:
        server.close()
    single = next((c["all_tokens_per_s"] for c in report["crowds"] if c["clients"] == 1), None)
    report["speedup_over_one_client"] = {c["clients"]: round(c["all_tokens_per_s"] / single, 2)
                                         for c in report["crowds"] if single and c["all_tokens_per_s"]}
    write(output, report)
    print(f"speed-up over one client: {report['speedup_over_one_client']}\nwrote {output}")


if __name__ == "__main__":
    run(main)
