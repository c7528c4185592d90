"""Step-time cost of mfumon's Lightning callback against no callback and Lightning's ThroughputMonitor.

One script, one process: a real `lightning.Trainer` trains a GPT-2 (random weights, from a
config) three ways, repeated in rotating order: with no callback, with Lightning's
ThroughputMonitor (given `flops_per_batch`), and with `mfumon.integrations.lightning.MFUCallback`.
Every run logs to a CSVLogger. The step time of a run is the benchmark's own clock over its
steps after warm-up (one device sync at each end, none in between); medians over repeats and
their ratios to the no-callback runs are printed with the device.

On CUDA the model is GPT-2 small (12 layers, 768 wide, 1024 tokens, batch 8) in bf16-mixed, and
the host syncs per step of each variant are counted under `torch.cuda.set_sync_debug_mode("warn")`
(an explicit `torch.cuda.synchronize()`, as ThroughputMonitor makes, is not counted there).
On the CPU it is a 2-layer, 128-wide GPT at 128 tokens.

    python benchmarks/bench_callbacks.py [--model sdpa|torch|hf] [--steps 60] [--warmup 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mfumon
from mfumon.integrations.lightning import MFUCallback


class RandomTokens(Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq,))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class SdpaBlock(nn.Module):
    """Pre-norm block: causal attention through scaled_dot_product_attention, a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class SdpaGPT(nn.Module):
    """GPT-2-shaped, with no host sync anywhere in its forward or backward."""

    def __init__(self, vocab: int, seq: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(SdpaBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class GPT(L.LightningModule):
    """GPT-2 small on CUDA, a 2-layer 128-wide one on the CPU, as one of three models.

    "sdpa" (default): SdpaGPT above, which makes no host sync, so a callback's syncs show fully
    in the step time; "torch": TinyGPT of examples/train_tiny_gpt.py (nn.MultiheadAttention);
    "hf": transformers' GPT2LMHeadModel. The last two sync the host dozens of times per step.
    """

    def __init__(self, cuda: bool, model: str, seq: int, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        width, layers, heads = (768, 12, 12) if cuda else (128, 2, 4)
        self.hf = model == "hf"
        self.model: nn.Module
        if self.hf:
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=seq)
            self.model = GPT2LMHeadModel(cfg)
        elif model == "torch":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
            from train_tiny_gpt import TinyGPT

            self.model = TinyGPT(vocab, seq, d_model=width, n_layers=layers, n_heads=heads)
        else:
            self.model = SdpaGPT(vocab, seq, width, layers, heads)
        self.flops_per_batch: int = 0  # read by ThroughputMonitor

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        if self.hf:
            return self.model(**batch, labels=ids).loss
        logits = self.model(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=self.device.type == "cuda")


class Clock(L.Callback):
    """Seconds per optimizer step over steps warmup+1..steps, with one device sync at each end."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = 0.0

    def _now(self, trainer: Any) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the benchmark's own clock: twice per run
        return time.perf_counter()

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = self._now(trainer)
        elif trainer.global_step == self.steps:
            self.t1 = self._now(trainer)

    @property
    def step_s(self) -> float:
        return (self.t1 - self.t0) / (self.steps - self.warmup)


def variants(module: GPT, batch: int, seq: int) -> dict[str, Callable[[], list[L.Callback]]]:
    module.flops_per_batch = mfumon.flops_per_token(module.model, seq) * batch * seq
    return {
        "no callback": list,
        "ThroughputMonitor": lambda: [
            ThroughputMonitor(
                batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=lambda b: b["input_ids"].numel()
            )
        ],
        "mfumon MFUCallback": lambda: [MFUCallback()],
    }


def fit(
    module: GPT,
    callbacks: list[L.Callback],
    data: DataLoader,
    *,
    steps: int,
    cuda: bool,
    log_dir: str,
) -> None:
    trainer = L.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=steps,
        callbacks=callbacks,
        logger=CSVLogger(log_dir),
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)


class SyncWatch(L.Callback):
    """Turns torch's sync debug mode to "warn" for optimizer steps warmup+1..steps (CUDA only)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.steps:
            torch.cuda.set_sync_debug_mode("default")


def syncs_per_step(
    module: GPT, make: Callable[[], list[L.Callback]], data: DataLoader, log_dir: str, steps: int = 30
) -> float:
    """Host syncs per optimizer step that torch's sync debug mode reports, over steps 11..`steps`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit(module, [*make(), SyncWatch(10, steps)], data, steps=steps, cuda=True, log_dir=log_dir)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / (steps - 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each run left out of its time")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant")
    parser.add_argument(
        "--model", choices=("sdpa", "torch", "hf"), default="sdpa", help="see GPT's docstring"
    )
    opts = parser.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=mfumon.MfumonWarning)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        device = torch.cuda.get_device_name()
        batch, seq, vocab = 8, 1024, 50304
    else:
        device = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
        batch, seq, vocab = 8, 128, 512
    module = GPT(cuda, opts.model, seq, vocab)
    data = DataLoader(RandomTokens(10**6, seq, vocab), batch_size=batch, pin_memory=cuda)
    runs = variants(module, batch, seq)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as log_dir:
        for rep in range(opts.repeats):
            for name in names[rep % 3 :] + names[: rep % 3]:  # rotate the order against drift
                clock = Clock(opts.warmup, opts.steps)
                fit(module, [*runs[name](), clock], data, steps=opts.steps, cuda=cuda, log_dir=log_dir)
                times[name].append(clock.step_s)
        syncs = {name: syncs_per_step(module, runs[name], data, log_dir) for name in names} if cuda else {}

    base = statistics.median(times["no callback"])
    params_m = sum(p.numel() for p in module.parameters()) / 1e6
    kind = {"sdpa": "sync-free GPT", "torch": "TinyGPT (nn.MultiheadAttention)", "hf": "HF GPT2LMHeadModel"}[
        opts.model
    ]
    precision = "bf16-mixed" if cuda else "fp32"
    print(f"{device}: {kind}, {params_m:.1f}M params, batch {batch} x {seq}, {precision}")
    print(f"{opts.repeats} runs per variant, {opts.steps - opts.warmup} timed steps each, medians:")
    for name in names:
        med = statistics.median(times[name])
        spread = f"(runs {', '.join(f'{t * 1e3:.2f}' for t in times[name])})"
        line = f"  {name:20s} {med * 1e3:8.2f} ms/step  {med / base:.4f}x  {spread}"
        if name in syncs:
            line += f"  host syncs/step {syncs[name]:.1f}"
        print(line)


if __name__ == "__main__":
    main()
