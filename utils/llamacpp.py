"""llama.cpp's own tools, always of the version llama-cpp-python runs: its converters (convert_hf_to_gguf.py,
convert_lora_to_gguf.py, taken from that version's source package, which carries llama.cpp whole) and its quantizer;
and generate.py --backend's flag checks (the backend itself: utils/llama_backend.py).

Using llama.cpp's converter rather than a writer of our own keeps every export in step with the runtime that reads
it: new architectures, tokenizer names (tokenizer.ggml.pre) and tensor layouts arrive with a new llama.cpp, and
the converter matching the installed runtime never writes something that runtime does not know.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from utils import durable
from utils.cli import UserError, log

INSTALL = "pip install llama-cpp-python==0.3.36"  # the tested version (requirements-dev.txt); builds llama.cpp
# What the converters need from llama.cpp's tree: the scripts, their model classes and their own gguf-py, which
# they put first on sys.path (so it never clashes with the `gguf` package transformers uses here).
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
# Runs a converter with one method replaced: llama.cpp names a BPE tokenizer's pre-tokenizer by hashing how it
# splits a sample text, so a tokenizer trained anew is never recognised; the user then names it (--pre_tokenizer).
NAMED_PRE_TOKENIZER = """import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
name, sys.argv = sys.argv[2], sys.argv[3:]
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: name
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# --outtype -> llama.cpp's file type name (llama_cpp.LLAMA_FTYPE_MOSTLY_*) for the types its quantizer makes.
QUANT_TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself
OUTTYPES = CONVERTER_TYPES + tuple(QUANT_TYPES)  # the rest by llama.cpp's quantizer
BACKENDS = ("transformers", "llama.cpp")  # generate.py --backend


def check_backend(backend: str, gguf_type: str, lora_weights: str, device: str, load_8bit: bool = False,
                  load_4bit: bool = False, bf16: Optional[bool] = None, compile: Optional[bool] = None) -> str:
    """generate.py --backend, checked with the flags it cannot honour: each a one-line UserError, in a millisecond."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}: choose {' or '.join(BACKENDS)}")
    if backend == "transformers":
        if gguf_type:
            raise UserError("--gguf_type applies to --backend llama.cpp: drop it, or add --backend llama.cpp")
        return backend
    hub_adapter = (bool(lora_weights) and not Path(lora_weights).expanduser().exists()
                   and not lora_weights.startswith((".", "/", "~")) and lora_weights.count("/") == 1)
    problems = [
        (load_8bit or load_4bit, f"--load_{'8' if load_8bit else '4'}bit is bitsandbytes' (--backend transformers); "
                                 "llama.cpp's quantized types come with the GGUF: --gguf_type q8_0 or q4_k_m"),
        (bool(compile), "--compile compiles transformers' decoding step: drop it with --backend llama.cpp"),
        (bool(bf16), "--bf16 is transformers' dtype: with --backend llama.cpp pass --gguf_type bf16"),
        (device not in ("auto", "cpu"), f"--backend llama.cpp runs on the CPU here: drop --device {device}, "
                                        "or use --backend transformers"),
        (bool(gguf_type) and gguf_type not in OUTTYPES, f"unknown --gguf_type {gguf_type!r}: choose {', '.join(OUTTYPES)}"),
        (hub_adapter, f"--backend llama.cpp converts the adapter to a GGUF LoRA from a local directory: download "
                      f"{lora_weights} first (e.g. `hf download {lora_weights} --local-dir ./adapter`)"),
        (importlib.util.find_spec("llama_cpp") is None, f"--backend llama.cpp needs llama-cpp-python: run `{INSTALL}` "
                                                        "(it builds llama.cpp, about 12 minutes on 2 cores)"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    from utils.methods import check_llamacpp

    check_llamacpp(lora_weights)
    return backend


def runtime_version() -> str:
    """The installed llama-cpp-python, whose llama.cpp every export is made for."""
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise UserError(f"GGUF export uses llama.cpp's own converter and quantizer: run `{INSTALL}` "
                        "(it builds llama.cpp, about 12 minutes on 2 cores)") from None


def converter_dir() -> Path:
    """llama.cpp's converters for the installed runtime, extracted once from its source package into the cache."""
    from utils.models import cache_root

    release = runtime_version()
    target = cache_root() / "llama.cpp" / release
    if not (target / "convert_hf_to_gguf.py").is_file():
        log(f"Fetching llama.cpp's converter from llama-cpp-python {release}'s source package (once)")
        with tempfile.TemporaryDirectory() as folder:
            extract_converter(download_sdist(release, Path(folder)), target)
    return target


def download_sdist(release: str, folder: Path) -> Path:
    """The source package, through pip (its cache makes a second download free)."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(folder),
               f"llama-cpp-python=={release}"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode or not found:
        reason = (result.stderr.strip().splitlines() or ["no source package"])[-1]
        raise UserError(f"could not fetch llama.cpp's converter ({reason}); check that "
                        f"`{' '.join(command[2:])}` works here")
    return found[0]


def extract_converter(sdist: Path, target: Path) -> None:
    """Only the converters' files, written beside target and renamed into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    durable.sweep(target.parent, target.name)
    with durable.durable_dir(target, keep_existing=True) as tmp:  # another process extracted it first: theirs is as good
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                path = member.name.split("/vendor/llama.cpp/", 1)[-1]
                if "/vendor/llama.cpp/" in member.name and path.startswith(CONVERTER_FILES) and "/vendor/" not in path:
                    member.name = path
                    members.append(member)
            tar.extractall(tmp, members, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py: this llama-cpp-python "
                            f"is laid out differently; `{INSTALL}` is the tested version")


def run_converter(script: str, args: list[str], pre_tokenizer: str = "") -> None:
    """One of llama.cpp's converters in a subprocess; its error, if any, as one line."""
    folder = converter_dir()
    command = [sys.executable, str(folder / script), *args]
    if pre_tokenizer:
        command = [sys.executable, "-c", NAMED_PRE_TOKENIZER, str(folder), pre_tokenizer, *command[1:]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["(no message)"]
        hint = ""
        if "pre-tokenizer was not recognized" in result.stderr:
            hint = ("; name how it splits text with --pre_tokenizer (llama-bpe for Llama 3, qwen2 for Qwen, "
                    "gpt-2, smollm, …: llama.cpp's src/llama-vocab.cpp lists them)")
        raise UserError(f"llama.cpp's {script} failed: {lines[-1].removeprefix('NotImplementedError: ')}{hint}")


def quantize(source: Path, target: Path, outtype: str) -> None:
    """llama.cpp's own quantizer (llama-quantize's defaults: the K-quant mixes keep some tensors at more bits)."""
    import ctypes
    import warnings

    import llama_cpp

    # llama_cpp opens /dev/null twice at import and never closes it: a ResourceWarning at exit, nothing to act on.
    warnings.filterwarnings("ignore", message="unclosed file <_io.TextIOWrapper name='/dev/null'", category=ResourceWarning)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANT_TYPES[outtype]}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)):
        raise UserError(f"llama.cpp could not quantize {source.name} to {outtype}")
