"""Per-GPU memory of LoRA training under DDP, FSDP2 and ZeRO-3, in bf16 and 4-bit: `python benchmarks/memory.py`
writes benchmarks/results/memory.json, which docs/scale.md's table is rendered from (benchmarks/report.py).

Computed, not measured (no GPU was lent): weights, LoRA weights with their gradients and AdamW state, and the
activations of one micro-batch at the README's recipe (micro-batch 4 × cutoff 512, LoRA r=8 on q/v). The same
arithmetic is checked against what tests/test_shard.py measures on 2 CPU ranks at small size (`cpu_check`). On
GPUs add the CUDA context and the allocator's slack (1-3 GiB); `ALPACA_LORA_PEAK_MEMORY=DIR` makes finetune.py
record each rank's peak (`gpu_peak_bytes`) for the comparison (docs/scale.md has the command).
"""

import json
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "memory.json"
GIB = 2**30
# LLaMA shapes: hidden, intermediate, layers, attention heads, KV heads, vocabulary.
MODELS = {
    "7B": dict(h=4096, i=11008, layers=32, heads=32, kv_heads=32, vocab=32000),     # Llama-2-7b
    "13B": dict(h=5120, i=13824, layers=40, heads=40, kv_heads=40, vocab=32000),    # Llama-2-13b
    "34B": dict(h=8192, i=22016, layers=48, heads=64, kv_heads=8, vocab=32000),     # CodeLlama-34b
    "70B": dict(h=8192, i=28672, layers=80, heads=64, kv_heads=8, vocab=32000),     # Llama-2-70b
}
RECIPE = dict(gpus=8, tokens=4 * 512, lora_r=8)  # the README: micro-batch 4 × cutoff 512; 8 GPUs as configs/
NF4_BYTES = 0.5 + (1 + 4 / 256) / 64  # 4 bits, plus an 8-bit scale per 64 weights and an fp32 one per 256 scales
LORA_BYTES = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's two moments
ZERO3_LIVE_PARAMETERS = 1e9  # configs/ds_zero3.json's stage3_max_live_parameters
# What tests/test_shard.py measured (2 CPU ranks, 2026-12-06): rank 1's peak in model copies once the model was
# sharded, and over a whole run, each beyond what the same run costs on the tiny model (imports, buffers, engine:
# 0.10-0.12 and 0.16-0.18 copies of this model).
CPU_MEASURED = {"fsdp": {"sharded": 0.53, "run": 0.73}, "zero3": {"sharded": 0.59, "run": 0.75}}
CPU_MODEL = dict(h=512, i=1408, layers=24, heads=8, kv_heads=8, vocab=512)  # test_shard.SHAPE
CPU_RECIPE = dict(gpus=2, tokens=190, lora_r=16)  # micro-batch 1 (about 190 tokens), LoRA r=16


def parameters(m: dict) -> tuple[int, int, int]:
    """(linear weights per layer, all linear weights, the rest: embeddings, output head, norms)."""
    kv = m["kv_heads"] * m["h"] // m["heads"]
    per_layer = m["h"] * (2 * m["h"] + 2 * kv) + 3 * m["h"] * m["i"]
    rest = 2 * m["vocab"] * m["h"] + (2 * m["layers"] + 1) * m["h"]
    return per_layer, per_layer * m["layers"], rest


def lora_parameters(m: dict, r: int) -> int:
    kv = m["kv_heads"] * m["h"] // m["heads"]
    return m["layers"] * r * (2 * m["h"] + m["h"] + kv)  # q: h→h, v: h→kv


def activations(m: dict, tokens: int, unit: int, checkpointing: bool) -> float:
    """Bytes saved for the backward pass of one micro-batch: per layer and token the norms' inputs and outputs,
    q/k/v, the attention output, the MLP's gate, up, activation and product; with gradient checkpointing only
    each layer's input plus one layer recomputed. The logits in 16 bits, their fp32 copy and gradient."""
    kv = m["kv_heads"] * m["h"] // m["heads"]
    layer = unit * (7 * m["h"] + 2 * kv + 4 * m["i"]) * tokens
    saved = (m["layers"] * unit * m["h"] * tokens + layer) if checkpointing else m["layers"] * layer
    return saved + tokens * m["vocab"] * (unit + 4 + 4)


def per_gpu(m: dict, launcher: str, bits: int, recipe: dict) -> dict:
    """GiB on each GPU while loading and while training (without / with gradient checkpointing)."""
    n = recipe["gpus"] if launcher != "ddp" else 1
    per_layer, linear, rest = parameters(m)
    unit = recipe.get("unit", 2)  # bytes of the compute dtype: bf16 on GPUs, fp32 in the CPU check
    weights = linear * (NF4_BYTES if bits == 4 else unit) + rest * unit  # embeddings and head stay 16-bit
    stored = NF4_BYTES if bits == 4 else unit  # bytes per linear weight as stored, sharded and gathered
    gathered = 0.0
    if launcher == "fsdp":
        gathered = 2 * per_layer * stored  # the layer computing and the next, prefetched
    elif launcher == "zero3":
        gathered = min(ZERO3_LIVE_PARAMETERS, linear + rest) * stored
    if bits == 4:
        gathered += m["h"] * m["i"] * unit  # the largest weight, dequantized for its matmul
    lora = lora_parameters(m, recipe["lora_r"]) * LORA_BYTES / n
    # A 4-bit base quantizes whole on every GPU before it is sharded; a 16-bit one loads sharded (FSDP: rank 0's
    # copy in CPU memory, broadcast; ZeRO-3: zero.Init).
    loading = weights if bits == 4 or launcher == "ddp" else weights / n
    train = [weights / n + gathered + lora + activations(m, recipe["tokens"], unit, gc) for gc in (False, True)]
    return {"weights_gib": round(weights / n / GIB, 2), "loading_gib": round(loading / GIB, 2),
            "train_gib": round(train[0] / GIB, 1), "train_checkpointing_gib": round(train[1] / GIB, 1)}


def cpu_check() -> dict:
    """The same arithmetic for tests/test_shard.py's model (fp32 on CPU), in model copies, beside the measurement."""
    copy = sum(parameters(CPU_MODEL)[1:]) * 4
    recipe = dict(CPU_RECIPE, unit=4)
    checks = {}
    for launcher, measured in CPU_MEASURED.items():
        figures = per_gpu(CPU_MODEL, launcher, 16, recipe)
        predicted = figures["train_checkpointing_gib"] * GIB / copy
        if launcher == "zero3":  # the test scales stage3_max_live_parameters to 1e6 for this model
            predicted -= (min(ZERO3_LIVE_PARAMETERS, copy / 4) - 1e6) * 4 / copy
        checks[launcher] = {"predicted_sharded": 0.5, "measured_sharded": measured["sharded"],
                            "predicted_run": round(predicted, 2), "measured_run": measured["run"]}
    return checks


def results() -> dict:
    table = [{"model": name, "launcher": launcher, "precision": "4-bit" if bits == 4 else "bf16",
              **per_gpu(shape, launcher, bits, RECIPE)}
             for name, shape in MODELS.items() for bits in (16, 4) for launcher in ("ddp", "fsdp", "zero3")]
    return {"recipe": RECIPE, "per_gpu": table, "cpu_check": cpu_check(),
            "note": "computed by benchmarks/memory.py; CUDA context and allocator slack (1-3 GiB) not included"}


if __name__ == "__main__":
    RESULT.write_text(json.dumps(results(), indent=1) + "\n")
    print(f"wrote {RESULT}")
