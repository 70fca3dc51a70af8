"""Run a script's entry point and SIGKILL it at a chosen write into a folder (tests/test_durable.py's real faults).

    python tests/faults.py WHERE FOLDER MODULE:FUNCTION JSON_KWARGS

A write is a tensor file saved (torch.save, safetensors: written, then cut to half its size, as a kill mid-write
leaves it), a file opened for writing (killed before it opens) or a rename into place (killed before it renames),
anywhere under FOLDER. Each is printed on stderr as `write N: WHAT PATH`; the process kills itself at the first
write whose line holds WHERE ("" kills nothing).
"""

import builtins
import io
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WHERE, FOLDER = sys.argv[1], Path(sys.argv[2]).resolve()
count = 0


def inside(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(FOLDER)


def write(what: str, path, cut: bool = False) -> None:
    global count
    count += 1
    line = f"{what} {Path(path).resolve().relative_to(FOLDER)}"
    print(f"write {count}: {line}", file=sys.stderr, flush=True)
    if WHERE and WHERE in line:
        if cut:
            os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def tensor_writer(real):
    def save(obj, path, *args, **kwargs):
        result = real(obj, path, *args, **kwargs)
        if inside(path):
            write(real.__name__, path, cut=True)
        return result
    return save


def renamer(real):
    def rename(src, dst, *args, **kwargs):
        if inside(dst):
            write(real.__name__, dst)
        return real(src, dst, *args, **kwargs)
    return rename


def opener(real):
    def open_(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and inside(file):
            write("open", file)
        return real(file, mode, *args, **kwargs)
    return open_


# Before anything imports them by name (peft and transformers bind safetensors' save_file at import).
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

safetensors.torch.save_file = tensor_writer(safetensors.torch.save_file)
torch.save = tensor_writer(torch.save)
os.replace, os.rename = renamer(os.replace), renamer(os.rename)
builtins.open = io.open = opener(io.open)

if __name__ == "__main__":
    module, function = sys.argv[3].split(":")
    kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    sys.argv = [str(REPO / f"{module}.py")]
    from utils.cli import run

    run(lambda: getattr(__import__(module), function)(**kwargs), [])
