"""Check the FP8 weighted peak on a real GPU (H100/H200): real FP8 training steps, what mfumon sees.

Run on the GPU machine (not a test; pytest does not collect it):

    python benchmarks/fp8_gpu_check.py [--steps 30] [--compile] [--device 0]

Three runs of the same Llama-shaped model (d=2048, 8 layers, MLP 8192, s=2048, batch 4, bf16
parameters), each under a Monitor with its stdout logger:

1. "bf16": plain bf16 training; the peak is the bf16 one, no mix.
2. "torchao": every linear but lm_head converted with torchao `convert_to_float8_training`;
   expected: a mix of fp8 84% / bf16 16% and a weighted peak of 1,699 TFLOP/s on an H100 SXM or
   H200 (fp8 1979, bf16 989.5),
   and a step faster than the bf16 one (with --compile; eager float8 casts are slow).
3. "te" (only when transformer_engine imports): Transformer Engine `LayerNormLinear`/`Linear`/
   `LayerNormMLP` blocks with a bf16 nn.Linear head, stepped inside `te.autocast` (or
   `fp8_autocast` on TE < 2.10): the mix must appear at the first forward; a fourth run without
   TE's autocast must show no fp8 (the TE path is untested on CPU: this is its check).

Prints one JSON object: per run, the peak (TFLOP/s, label, weighted, fallback), the mix, MFU,
TFLOP/s per device, tokens/s and step time, plus torch/torchao/TE versions. Each run is guarded,
so a failure shows up as an "error" field instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mfumon
from mfumon import metrics as K
from mfumon.devices import device_name

D, LAYERS, FFN, HEADS, KV_HEADS, VOCAB, SEQ, BATCH = 2048, 8, 8192, 16, 8, 32_000, 2048, 4


def llama(device: torch.device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.to(device)


class TEBlock(nn.Module):
    """One pre-norm block of Transformer Engine GEMM modules; attention is bf16 SDPA (not TE's)."""

    def __init__(self, te: Any) -> None:
        super().__init__()
        self.qkv = te.LayerNormLinear(D, 3 * D, bias=False, params_dtype=torch.bfloat16)
        self.proj = te.Linear(D, D, bias=False, params_dtype=torch.bfloat16)
        self.mlp = te.LayerNormMLP(D, FFN, bias=False, params_dtype=torch.bfloat16)
        self.num_heads, self.head_dim = HEADS, D // HEADS  # read by mfumon for the attention term

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)  # (3, B, H, S, hd)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, D))
        return x + self.mlp(x)


class TELM(nn.Module):
    def __init__(self, te: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D, dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(TEBlock(te) for _ in range(LAYERS))
        self.lm_head = nn.Linear(D, VOCAB, bias=False, dtype=torch.bfloat16)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(x).float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


def run(
    model: nn.Module,
    steps: int,
    device: torch.device,
    context: Callable[[], Any] = contextlib.nullcontext,
    compile_model: bool = False,
) -> dict[str, Any]:
    """`steps` AdamW steps under a Monitor; what the monitor reported, and the peak it used."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator(device=device).manual_seed(0)
    mon = mfumon.Monitor(model, seq_len=SEQ, log_every=5, warmup=5, loggers=("stdout",))
    before = {"label": mon.peak.label, "pending": mon.peak.pending}
    start = time.perf_counter()
    with mon:
        for _ in range(steps):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device, generator=gen)
            with context():
                loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(tokens=ids.numel())
    peak = mon.peak
    summary = mon.summary()
    return {
        "peak_at_setup": before,
        "peak_tflops": peak.tflops,
        "peak_label": peak.label,
        "peak_weighted": peak.weighted,
        "peak_fallback": peak.fallback,
        "peak_mix": dict(peak.mix),
        "flops_per_token": mon.flops_per_token,
        "mfu": summary.get(K.MFU),
        "tflops_per_device": summary.get(K.TFLOPS_PER_DEVICE),
        "tokens_per_s": summary.get(K.TOKENS_PER_S),
        "step_time_ms": summary.get(K.STEP_TIME_MS),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def guarded(name: str, fn: Callable[[], dict[str, Any]], out: dict[str, Any]) -> None:
    try:
        out[name] = fn()
    except Exception as exc:
        out[name] = {"error": repr(exc), "trace": traceback.format_exc(limit=4)}
    finally:
        torch.cuda.empty_cache()
    print(f"# {name}: {json.dumps(out[name], default=str)}", file=sys.stderr, flush=True)


def torchao_run(device: torch.device, steps: int, compile_model: bool) -> dict[str, Any]:
    from torchao.float8 import convert_to_float8_training

    model = convert_to_float8_training(llama(device), module_filter_fn=lambda m, fqn: fqn != "lm_head")
    return run(model, steps, device, compile_model=compile_model)


def te_run(device: torch.device, steps: int, fp8: bool) -> dict[str, Any]:
    import transformer_engine.pytorch as te

    autocast = getattr(te, "autocast", None) or te.fp8_autocast  # TE >= 2.10 renamed it
    model = TELM(te).to(device)
    context = (lambda: autocast(enabled=True)) if fp8 else contextlib.nullcontext
    return run(model, steps, device, context=context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the torchao run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_gpu_check needs a CUDA GPU (H100/H200 for fp8)")
    device = torch.device("cuda", args.device)
    torch.cuda.set_device(device)
    out: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "capability": list(torch.cuda.get_device_capability(device)),
        "peaks_tflops": {d: (mfumon.peak_flops(dtype=d, device=device) or 0) / 1e12 for d in ("bf16", "fp8")},
    }
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        out["torchao"] = None
    guarded("bf16", lambda: run(llama(device), args.steps, device), out)
    if out["torchao"]:
        guarded("torchao", lambda: torchao_run(device, args.steps, args.compile), out)
    try:
        import transformer_engine

        out["transformer_engine"] = transformer_engine.__version__
    except Exception as exc:  # not installed, or installed without its CUDA libraries
        out["transformer_engine"] = f"not importable ({type(exc).__name__})"
    else:
        guarded("te_fp8", lambda: te_run(device, args.steps, fp8=True), out)
        guarded("te_no_autocast", lambda: te_run(device, args.steps, fp8=False), out)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
