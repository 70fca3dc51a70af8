"""A crowd on one server: N API clients at once against `python generate.py --api` with its default flags.

    python benchmarks/bench_serving.py                      # the embedded SmolLM2-135M: 1, 4, 16, 64, 200 clients
    python benchmarks/bench_serving.py --clients 1,16 --smoke   # a minute, on a tiny random model
    python benchmarks/bench_serving.py --at_start --flags "bf16=False" --rounds 2   # 200 clients the moment it answers

Every client sends one streamed chat completion (greedy, max_tokens 16) at the same moment. Reported per crowd size:
how many were answered and how many turned away (HTTP 429/503) or failed, the time to first token and the total
latency (p50, p95), and the tokens/s of all answers together (tokens / time from the start to the last answer).
The server is generate.py itself on a free port, once its compiled step is in use; the machine's load average is
recorded next to each figure, as other work on a shared machine slows every figure. Writes
benchmarks/results/serving-<machine>.json.

--at_start measures what the first users of a fresh server get: each round starts generate.py anew for each set of
--flags in turn (A/B alternating) and sends one crowd (the largest --clients) the moment /v1/models answers, while
the server may still be compiling its decoding step. Recorded: the CPU's flags and any ISA caps in the environment
(ONEDNN_MAX_CPU_ISA=AVX2 ... shows an AVX2-only CPU), the precision the server loaded, p50/p95, the seconds until
all are answered, and when the compiled step came into use. Writes benchmarks/results/serving-at-start-<machine>.json.
"""

import json
import os
import re
import time
import urllib.request
from pathlib import Path

from common import REPO, Server, at_once, chat, commit, machine, percentiles, smoke_model, with_load, write
from utils.cli import UserError, run


def request(url: str, max_tokens: int) -> dict:
    """One greedy answer, or the status that refused it (None: it failed): a crowd goes on either way."""
    import httpx

    try:
        return dict(chat(url, max_tokens, temperature=0), status=200)
    except httpx.HTTPStatusError as err:
        try:
            error = err.response.read().decode(errors="replace")[:200]
        except httpx.StreamError:  # the stream was closed unread
            error = f"HTTP {err.response.status_code}"
        return dict(status=err.response.status_code, error=error)
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
        errors=sorted({r["error"] for r in results if r.get("error")})[:3],  # what the failed ones got, a few kinds
        first_token_s=percentiles([r["first_token_s"] for r in answered]),
        total_s=percentiles([r["total_s"] for r in answered]),
        tokens=tokens,
        all_answered_s=round(max(r["end"] for r in answered) - started, 1) if answered else None,
        all_tokens_per_s=round(tokens / (max(r["end"] for r in answered) - started), 1) if answered else None)


ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # caps an AVX2-only run sets


def models_answer(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "v1/models", timeout=5):
            return True
    except OSError:
        return False


def parse_flags(flags: str) -> list[dict]:
    """--flags "bf16=False;bf16=False compile=False" as one dict of generate.py flags per server variant."""
    variants = []
    for variant in str(flags).split(";"):
        pairs = [pair.partition("=") for pair in variant.split()]
        if any(not key or not sep for key, sep, _ in pairs):
            raise UserError(f"--flags {flags!r}: each server is space-separated name=value pairs, servers separated by ;")
        variants.append({key: value for key, _, value in pairs})
    return variants


def at_start(flags: dict, clients: int, max_tokens: int, code: Path) -> dict:
    """A fresh server (`code`'s generate.py), and one crowd sent the moment it answers /v1/models."""
    from utils.generation import COMPILED_LINE

    server = Server(flags, code)
    try:
        ready_s = server.wait(lambda: models_answer(server.url), "answered /v1/models")
        result = with_load(lambda: crowd(server.url, clients, max_tokens))
        loaded = next((line for _, line in server.lines if line.startswith("Loading ")), "")
        exited = server.proc.poll()
        return dict(flags=flags, code=commit(code), ready_s=ready_s, precision=(re.findall(r"\((\w+)\)$", loaded) or [None])[0],
                    compiled_s=server.seen(COMPILED_LINE),
                    compiling=server.seen("compiles in the background") is not None, **result,
                    **(dict(server_exit=exited, server_tail=[line for _, line in server.lines[-8:]])
                       if exited is not None else {}))
    finally:
        server.close()


def main(clients: str = "1,4,16,64,200", max_tokens: int = 16, smoke: bool = False, output: str = "",
         at_start: bool = False, flags: str = "", rounds: int = 1, code: str = ""):
    """Crowds of API clients against one generate.py --api server; write JSON.

    Args:
        clients: Comma-separated crowd sizes, each sent at once.
        max_tokens: Each request's max_tokens.
        smoke: A tiny random model instead of the embedded one (checks the script, not the speed).
        output: The JSON file to write; default: benchmarks/results/serving-<machine>.json (serving-at-start-... with --at_start).
        at_start: Start a fresh server per round and variant and send one crowd (the largest --clients) the moment /v1/models answers.
        flags: generate.py flags of the server, name=value separated by spaces, e.g. "bf16=False"; with --at_start several servers separated by ";", alternated each round.
        rounds: With --at_start, how many times each server is started and measured.
        code: With --at_start, the checkout whose generate.py is started (e.g. the code before a change); default: this one. Runs are added to the results file.
    """
    sizes = [c for c in clients.split(",") if c]
    if not sizes or not all(c.isdigit() and int(c) > 0 for c in sizes):
        raise UserError("--clients must be comma-separated whole numbers above 0, e.g. 1,4,16")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError("--max_tokens must be a whole number, at least 1")
    if not isinstance(rounds, int) or rounds < 1:
        raise UserError("--rounds must be a whole number, at least 1")
    variants = parse_flags(flags)
    if len(variants) > 1 and not at_start:
        raise UserError("--flags names several servers (;) only with --at_start")
    folder = Path(code or REPO).resolve()
    if not (folder / "generate.py").is_file():
        raise UserError(f"--code {code}: no generate.py there; pass a checkout of this project")
    base_model = smoke_model() if smoke else ""
    if at_start:
        return measure_at_start(variants, max(map(int, sizes)), max_tokens, base_model, output, rounds, folder)
    report = dict(machine("machine", "cpu", "isa_flags", "cpus", "date"),
                  model=base_model or "SmolLM2-135M-Instruct (embedded)",
                  server="python generate.py --api (default flags)", max_tokens=max_tokens, crowds=[])
    output = Path(output or REPO / "benchmarks" / "results" / f"serving-{report['machine']}.json")
    server = Server(dict(variants[0], base_model=base_model))
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



def measure_at_start(variants: list[dict], clients: int, max_tokens: int, base_model: str, output: str,
                     rounds: int, code: Path) -> None:
    """--at_start: each round, each server variant in turn, freshly started; add the runs to the JSON file."""
    header = machine("machine", "cpu", "isa_flags", "cpus", "date")
    output = Path(output or REPO / "benchmarks" / "results" / f"serving-at-start-{header['machine']}.json")
    report = json.loads(output.read_text()) if output.is_file() else dict(runs=[])
    report.update(header, isa_limits={k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
                  model=base_model or "SmolLM2-135M-Instruct (embedded)", clients=clients, max_tokens=max_tokens)
    for round_ in range(rounds):
        for flags in variants:
            started = time.strftime("%H:%M UTC", time.gmtime())
            run_ = dict(at_start(dict(flags, base_model=base_model), clients, max_tokens, code), started=started,
                        round=round_ + 1)
            report["runs"].append(run_)
            print(json.dumps(run_), flush=True)
            write(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
