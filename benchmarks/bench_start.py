"""How soon `python generate.py` is usable: seconds from launch to the page answering, to the first answer's first
token, and to the compiled decoding step being in use, with an empty and with a reused compile cache.

    python benchmarks/bench_start.py                    # the embedded SmolLM2-135M, default flags (a few minutes)
    python benchmarks/bench_start.py --code /tmp/before  # the same figures for another checkout's generate.py
    python benchmarks/bench_start.py --smoke            # a tiny random model (checks the script, not the speed)

Each round starts generate.py --api (the demo's defaults; --api only adds the routes that the timing request uses)
twice on a free port: "cold" with TORCHINDUCTOR_CACHE_DIR pointing at a new, empty folder, then "warm" reusing it.
As soon as the page answers, one streamed greedy chat completion (16 tokens) is sent. The compiled step is in use
when the server says so on stderr (utils.generation.COMPILED_LINE); a server that compiles before it serves (the
code before this benchmark existed) has it in use from the moment it answers. The machine's load average is
recorded next to each figure. Writes benchmarks/results/start-<machine>.json.
"""

import json
import tempfile
import time
from pathlib import Path

from common import REPO, Server, chat, commit, machine, smoke_model, with_load, write
from utils.cli import UserError, run

COMPILES_FIRST = "Compiling the decoding step (once, at start)"  # what the code before printed, then compiled


def one_start(code: Path, flags: dict, cache: Path) -> dict:
    """Launch, page, first answer, compiled step in use: seconds from launch to each."""
    from utils.generation import COMPILED_LINE

    server = Server(flags, code, env=dict(TORCHINDUCTOR_CACHE_DIR=str(cache)))
    try:
        page_s = server.wait_for_page()
        sent = time.perf_counter() - server.started
        answer = chat(server.url, 16, temperature=0)
        if not answer["first_token_s"]:
            raise SystemExit(f"the first request got no text: {answer}")
        compiles_first = server.seen(COMPILES_FIRST) is not None and server.seen(COMPILED_LINE) is None
        return dict(page_s=page_s, first_token_s=round(sent + answer["first_token_s"], 1),
                    answer_s=round(sent + answer["total_s"], 1), answer_tokens=answer["tokens"],
                    compiled_s=page_s if compiles_first else server.wait_for(COMPILED_LINE),
                    compiled_before_serving=compiles_first)
    finally:
        server.close()


def main(rounds: int = 1, code: str = "", label: str = "", smoke: bool = False, output: str = ""):
    """Cold and warm starts of generate.py; write JSON and print the figures.

    Args:
        rounds: Cold + warm pairs to run (each cold start with a new, empty cache folder).
        code: The checkout whose generate.py is started; default: this one.
        label: The name of these figures in the results file; default: "after" for this checkout, else "before".
        smoke: A tiny random model instead of the embedded one.
        output: The JSON file to add the figures to; default: benchmarks/results/start-<machine>.json.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise UserError("--rounds must be a whole number, at least 1")
    folder = Path(code or REPO).resolve()
    if not (folder / "generate.py").is_file():
        raise UserError(f"--code {code}: no generate.py there; pass a checkout of this project")
    label = label or ("after" if folder == REPO else "before")
    flags = dict(base_model=smoke_model()) if smoke else {}
    header = machine("machine", "cpu", "isa_flags", "cpus", "avx512_bf16")
    output = Path(output or REPO / "benchmarks" / "results" / f"start-{header['machine']}.json")
    report = json.loads(output.read_text()) if output.is_file() else {}
    report.update(header, model="tiny random LLaMA (smoke)" if smoke else "SmolLM2-135M-Instruct (embedded)",
                  server="python generate.py --api (default flags)", answer_tokens=16)
    runs = report.setdefault("runs", {})
    runs[label] = dict(date=time.strftime("%Y-%m-%d"), code=commit(folder), cold=[], warm=[])
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            for kind in ("cold", "warm"):
                result = with_load(lambda: one_start(folder, flags, Path(cache)))
                runs[label][kind].append(result)
                print(f"{label} {kind}: {json.dumps(result)}", flush=True)
                write(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
