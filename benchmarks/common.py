"""What the benchmarks share: the machine a figure was measured on and its load, the timing of one streamed answer,
requests sent at once, a generate.py server on a free port, and the results file. Nothing here imports torch at
import time: every script's --help stays quick."""

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's utils, for every script that imports this module
WORK = Path(tempfile.gettempdir()) / "alpaca-lora-bench"  # exports and test models, made once and reused
INSTRUCTION = "Tell me about alpacas."
LIMIT_S = 1200  # a server that has not answered (or compiled) by then is stuck


def cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_model() -> str:
    """The CPU's name, its bf16 units (AMX, AVX512-BF16) and whether this run may use them."""
    from utils.models import cpu_has_bf16

    info = cpuinfo()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), platform.machine())
    units = [unit for flag, unit in ((" amx_bf16", "AMX"), (" avx512_bf16", "AVX512-BF16")) if flag in info]
    return name + (f" ({', '.join(units)}{'' if cpu_has_bf16() else ', hidden from this run'})" if units else "")


def isa_flags() -> list[str]:
    """The CPU's vector and matrix extensions (what decides its matmul speed)."""
    line = next((l for l in cpuinfo().splitlines() if l.startswith("flags")), ":")
    return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))


ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # caps an AVX2-only run sets


def isa_limits() -> dict:
    """The ISA caps this run was started with (how a CPU without AVX512 or AMX is imitated): {} for none."""
    return {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}


def machine(*keys: str, gpu: bool = False) -> dict:
    """The `keys` of the machine header: machine (the results file's name), cpu, isa_flags, avx512_bf16, cpus, date."""
    name = f"cpu-{os.cpu_count()}core"
    if gpu:
        import torch

        name = torch.cuda.get_device_name(0).replace(" ", "-").lower() if torch.cuda.is_available() else "cpu-smoke"
    flags = isa_flags()
    every = dict(machine=name, cpu=cpu_model(), isa_flags=flags, avx512_bf16="avx512_bf16" in flags,
                 cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    return {key: every[key] for key in keys}


def with_load(measure: Callable[[], dict]) -> dict:
    """measure()'s result with the 1-minute load average before and after: other work on a shared machine slows it."""
    before = os.getloadavg()[0]
    result = measure()
    result["load_average"] = [round(before, 1), round(os.getloadavg()[0], 1)]
    return result


def write(path: Path, report: dict) -> None:
    """The results file, rewritten after every figure so that a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def median(values, digits: int):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def percentiles(values: list) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return dict(p50=None, p95=None)
    return dict(p50=round(statistics.median(values), 3), p95=round(values[min(len(values) - 1, int(0.95 * len(values)))], 3))


class Timer:
    """Time stamps of the text pieces of one answer."""

    def __init__(self):
        self.start, self.pieces, self.tokens = time.perf_counter(), [], 0

    def piece(self, text: str) -> None:
        if text:
            self.pieces.append(time.perf_counter())

    def result(self) -> dict:
        first, last = (self.pieces[0], self.pieces[-1]) if self.pieces else (None, None)
        decode = (self.tokens - 1) / (last - first) if self.pieces and self.tokens > 1 and last > first else None
        return dict(first_token_s=round(first - self.start, 3) if first else None, tokens=self.tokens,
                    decode_tokens_per_s=round(decode, 1) if decode else None,
                    total_s=round((last or time.perf_counter()) - self.start, 3))


def chat(url: str, max_tokens: int, **sampling) -> dict:
    """One streamed POST /v1/chat/completions of INSTRUCTION, timed; tokens from its usage. An HTTP error status
    raises httpx.HTTPStatusError, an error event RuntimeError."""
    import httpx

    timer = Timer()
    body = dict(model="bench", messages=[{"role": "user", "content": INSTRUCTION}], max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}, **sampling)
    with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            for choice in event.get("choices", []):
                timer.piece(choice["delta"].get("content") or "")
            if event.get("usage"):
                timer.tokens = event["usage"]["completion_tokens"]
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
    return timer.result()


def at_once(request: Callable[[], dict], n: int) -> tuple[list[dict], float]:
    """`n` copies of one request released together: their results, each with its end time, and the start time."""
    results, barrier = [None] * n, threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = dict(request(), end=time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(r is None for r in results):
        raise RuntimeError("a concurrent request failed")
    return results, started


def commit(folder: Path) -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes), or its folder's name outside git."""
    described = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return described.stdout.strip() if described.returncode == 0 else folder.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_model(folder: Path = WORK) -> str:
    """A tiny random LLaMA with the embedded model's tokenizer: every code path in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.models import load_tokenizer, resolve_base_model

    path = folder / "tiny-llama"
    if not (path / "config.json").is_file():
        tokenizer = load_tokenizer(resolve_base_model(None))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # never a token that shows nothing (whitespace, special), so that answers have text
            blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
            model.lm_head.weight[blank] = 0
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


class Server:
    """`python generate.py --api` of a checkout (`code`) on a free port, each line it prints timed as it comes."""

    def __init__(self, flags: dict, code: Path = REPO, env: Optional[dict] = None):
        self.port, self.lines = free_port(), []
        self.url = f"http://127.0.0.1:{self.port}/"
        args = [f"--{k}={v}" for k, v in dict(flags, api=True, server_port=self.port).items() if v != ""]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "generate.py", *args], cwd=code, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip()))

    def seen(self, text: str) -> Optional[float]:
        """Seconds from launch to the first line containing `text`, or None."""
        return next((round(t, 1) for t, line in self.lines if text in line), None)

    def wait(self, ready: Callable[[], bool], what: str) -> float:
        """Seconds from launch until ready(); the server's last lines if it exits or takes over LIMIT_S first."""
        while not ready():
            if self.proc.poll() is not None or time.perf_counter() - self.started > LIMIT_S:
                raise SystemExit(f"generate.py never {what}:\n" + "\n".join(line for _, line in self.lines[-20:]))
            time.sleep(0.2)
        return round(time.perf_counter() - self.started, 1)

    def wait_for_page(self) -> float:
        def answers() -> bool:
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return True
            except OSError:
                return False

        return self.wait(answers, "answered")

    def wait_for(self, *texts: str) -> float:
        """Seconds from launch to the first of `texts` printed."""
        self.wait(lambda: any(self.seen(t) is not None for t in texts), f"printed {' or '.join(map(repr, texts))}")
        return min(self.seen(t) for t in texts if self.seen(t) is not None)

    def compiled(self) -> Optional[float]:
        """When the compiled decoding step came into use; a server that compiles it in the background (answering
        uncompiled meanwhile) is waited for, so that the figures after this are the compiled step's."""
        from utils.generation import COMPILED_LINE  # here, not at the top: --help imports no torch

        if self.seen("compiles in the background") is not None:
            self.wait_for(COMPILED_LINE, "Compiling the decoding step failed")
        return self.seen(COMPILED_LINE)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
