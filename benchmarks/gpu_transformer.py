"""Model FLOPs utilization (MFU) of the transformer at a size that fills an H200.

    python benchmarks/gpu_transformer.py                 # on a GPU: the H200 size
    python benchmarks/gpu_transformer.py --size tiny     # anywhere: a smoke run (CPU test)
    python benchmarks/gpu_transformer.py --remat full    # each block rematerialized
    python benchmarks/gpu_transformer.py --mesh fsdp=2,tensor=4 --scan-layers  # 8 GPUs

Trains `jaxmint.models.transformer` with bf16 compute (float32 master params),
sequence 2048 and cuDNN attention where available, through `jaxmint.fit`, and
reports MFU = model FLOPs per second / the chip's dense bf16 peak. Model FLOPs
per token: 6 * params (matmuls, forward and backward) + 12 * layers * seq * d_model
(attention scores and values); a rematerialized block's recomputation is not
model FLOPs, so remat lowers MFU by what it recomputes. Target on an H200: >= 45%.
``fit`` trains on every device (data parallel by default; ``--mesh`` lays the step
out on a mesh of them with the default sharding rules), and MFU is over all of them.
``--scan-layers`` runs the blocks as one scan (``transformer(scan_layers=True)``).
The peak memory of each device comes from its allocator (``memory_stats``; none on a
CPU).
Writes benchmarks/results/gpu_transformer.json (``--out`` elsewhere).
``benchmarks/gpu_checks.sh`` runs it with the other checks an accelerator is for.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxmint
from jaxmint.models._remat import POLICIES

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, no sparsity
SIZES = {
    # ~400M params: fills an H200 with batch 16 x 2048 tokens at bf16.
    "h200": dict(d_model=1536, num_layers=14, num_heads=12, seq_len=2048, batch=16, steps=60),
    "tiny": dict(d_model=32, num_layers=1, num_heads=2, seq_len=64, batch=4, steps=6),
}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="h200 on a GPU, tiny elsewhere (default by platform)",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--remat", choices=sorted(POLICIES), default="none")
    parser.add_argument(
        "--mesh", default=None, help="a device mesh, e.g. fsdp=2,tensor=4 (default: fit's)"
    )
    parser.add_argument("--scan-layers", action="store_true", help="the blocks as one scan")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_transformer.json")
    args = parser.parse_args()
    on_gpu = jax.devices()[0].platform == "gpu"
    size = dict(SIZES[args.size or ("h200" if on_gpu else "tiny")])
    steps = args.steps or size.pop("steps")
    size.pop("steps", None)
    seq, batch = size.pop("seq_len"), size.pop("batch")
    vocab = 256

    attention = jax.nn.dot_product_attention
    if on_gpu:
        attention = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    model = jaxmint.models.transformer(
        vocab,
        max_len=seq,
        attention=attention,
        remat=args.remat,
        scan_layers=args.scan_layers,
        **size,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch * 8, seq + 1), dtype=np.int32)
    data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    times: list[float] = []

    def clock(step, record):
        times.append(time.perf_counter())

    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adamw(3e-4),
        data,
        steps=steps,
        batch_size=batch,
        compute_dtype="bfloat16",
        log_every=1,
        progress=False,
        hooks=[clock],
        **({"mesh": args.mesh} if args.mesh else {}),
    )
    devices = jax.device_count()  # fit lays the step out on all of them (data by default)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(result.params))
    d, layers = size["d_model"], size["num_layers"]
    flops_per_token = 6 * n_params + 12 * layers * seq * d
    warm = max(2, steps // 5)  # skip compile and warm-up steps
    per_step = (times[-1] - times[warm]) / (len(times) - 1 - warm)
    achieved = flops_per_token * batch * seq / per_step
    peak = peak_flops()
    peak = peak * devices if peak else None
    stats = [d.memory_stats() or {} for d in jax.local_devices()[:devices]]
    peak_bytes = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    results = {
        "device": jax.devices()[0].device_kind,
        "params": n_params,
        "remat": args.remat,
        "mesh": args.mesh,
        "scan_layers": args.scan_layers,
        "devices": devices,
        "peak_bytes_per_device": max(peak_bytes) if peak_bytes else None,
        "tokens_per_step": batch * seq,
        "seconds_per_step": per_step,
        "model_tflops_per_sec": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "target_mfu": 0.45,
        "final_loss": result.history[-1]["loss"],
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
