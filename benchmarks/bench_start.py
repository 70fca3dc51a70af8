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
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.cli import UserError, run  # noqa: E402
from bench_generate import compiled_line, free_port, smoke_model  # noqa: E402  (this folder, where the script runs from)
from bench_serving import isa_flags, request  # noqa: E402
from bench_train import cpu_model, machine_name  # noqa: E402

COMPILES_FIRST = "Compiling the decoding step (once, at start)"  # what the code before printed, then compiled
LIMIT_S = 1200


class Launch:
    """One generate.py process: the time of each stderr line, read as it comes."""

    def __init__(self, code: Path, flags: list[str], cache: Path):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
        self.port, self.lines = free_port(), []
        self.url = f"http://127.0.0.1:{self.port}/"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "generate.py", "--api", f"--server_port={self.port}", *flags],
                                     cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip()))

    def seen(self, text: str):
        """Seconds from launch to the first line containing `text`, or None."""
        return next((round(t, 1) for t, line in self.lines if text in line), None)

    def wait_for_page(self) -> float:
        import urllib.request

        while time.perf_counter() - self.started < LIMIT_S:
            if self.proc.poll() is not None:
                raise SystemExit("generate.py failed:\n" + "\n".join(line for _, line in self.lines[-20:]))
            try:
                urllib.request.urlopen(self.url, timeout=5)
                return round(time.perf_counter() - self.started, 1)
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"generate.py did not answer within {LIMIT_S} s")

    def wait_for(self, text: str) -> float:
        while self.seen(text) is None:
            if self.proc.poll() is not None or time.perf_counter() - self.started > LIMIT_S:
                raise SystemExit(f"generate.py never printed {text!r}:\n" + "\n".join(l for _, l in self.lines[-20:]))
            time.sleep(0.2)
        return self.seen(text)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def one_start(code: Path, flags: list[str], cache: Path) -> dict:
    """Launch, page, first answer, compiled step in use: seconds from launch to each."""
    load = os.getloadavg()[0]
    server = Launch(code, flags, cache)
    try:
        page_s = server.wait_for_page()
        sent = time.perf_counter() - server.started
        answer = request(server.url, 16)
        if answer.get("status") != 200 or not answer.get("first_token_s"):
            raise SystemExit(f"the first request failed: {answer}")
        compiles_first = server.seen(COMPILES_FIRST) is not None and server.seen(compiled_line()) is None
        compiled_s = page_s if compiles_first else server.wait_for(compiled_line())
        return dict(page_s=page_s, first_token_s=round(sent + answer["first_token_s"], 1), answer_s=round(answer["end"] - server.started, 1),
                    answer_tokens=answer["tokens"], compiled_s=compiled_s, compiled_before_serving=compiles_first,
                    load_average=[round(load, 1), round(os.getloadavg()[0], 1)])
    finally:
        server.close()


def commit(folder: Path) -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes), or its folder's name outside git."""
    described = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return described.stdout.strip() if described.returncode == 0 else folder.name


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
    flags = [f"--base_model={smoke_model(Path(tempfile.gettempdir()) / 'alpaca-lora-bench')}"] if smoke else []
    output = Path(output or REPO / "benchmarks" / "results" / f"start-{machine_name(False)}.json")
    report = json.loads(output.read_text()) if output.is_file() else {}
    report.update(machine=machine_name(False), cpu=cpu_model(), isa_flags=isa_flags(), cpus=os.cpu_count(),
                  model="tiny random LLaMA (smoke)" if smoke else "SmolLM2-135M-Instruct (embedded)",
                  avx512_bf16="avx512_bf16" in isa_flags(), server="python generate.py --api (default flags)",
                  answer_tokens=16)
    runs = report.setdefault("runs", {})
    runs[label] = dict(date=time.strftime("%Y-%m-%d"), code=commit(folder), cold=[], warm=[])
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            for kind in ("cold", "warm"):
                result = one_start(folder, flags, Path(cache))
                runs[label][kind].append(result)
                print(f"{label} {kind}: {json.dumps(result)}", flush=True)
                output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
