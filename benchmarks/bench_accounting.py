"""How long count_params + flop_breakdown take on a DeepSeek-V3-size model (671B) on the meta device.

    python benchmarks/bench_accounting.py               # transformers from the venv (5.x: stacked experts)
    PYTHONPATH=.tf4 python benchmarks/bench_accounting.py   # transformers 4.57 (14,848 expert modules)

Goal: under 2 s for counting and FLOPs together. Model construction is reported separately: it is
transformers' time, not ours.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from mfumon.flops import flop_breakdown
from mfumon.params import count_params

DEEPSEEK_V3 = dict(  # deepseek-ai/DeepSeek-V3 config.json (the parts that shape the parameters)
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="noaux_tc",
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=163840,
    tie_word_embeddings=False,
)


def main(repeats: int = 5) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3)
    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    build_s = time.perf_counter() - start
    modules = sum(1 for _ in model.modules())

    start = time.perf_counter()
    counts = count_params(model)  # cold: walks the model and caches the layout
    breakdown = flop_breakdown(model, 4096)
    first_s = time.perf_counter() - start

    walks, breakdowns = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        count_params(model, cache=False)  # the full structural walk again
        walks.append(time.perf_counter() - start)
        start = time.perf_counter()
        flop_breakdown(model, 4096)  # from the cached layout, as the monitor calls it
        breakdowns.append(time.perf_counter() - start)

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    version = transformers.__version__
    print(f"transformers {version}: DeepSeek-V3 on meta, {modules:,} modules, built in {build_s:.2f} s")
    print(f"total {counts.total:,}  active {counts.active:,}  flops/token at 4096: {breakdown.total:,}")
    print(f"first count_params + flop_breakdown: {first_s:.3f} s (goal < 2 s)")
    print(f"count_params walk, median of {repeats}: {statistics.median(walks):.3f} s")
    cached_ms = statistics.median(breakdowns) * 1e3
    print(f"flop_breakdown from the cached layout, median of {repeats}: {cached_ms:.3f} ms")


if __name__ == "__main__":
    main()
