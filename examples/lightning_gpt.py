"""Train a small GPT-2 with Lightning for a few dozen steps, mfumon's callback logging to CSV.

Random weights from a config (no download), random tokens with some padding. Runs on the GPU
when there is one (bf16-mixed) and on the CPU otherwise, in under a minute. MFUCallback prints
nothing itself here except the summary below: its keys go to the Trainer's CSVLogger
(runs/lightning/version_*/metrics.csv), with gradient accumulation 2 and validation every
10 optimizer steps left out of the timing.

    python examples/lightning_gpt.py [--steps 40] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import csv
import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from mfumon.integrations.lightning import MFUCallback


class PaddedTokens(Dataset):
    """Random token rows; the last eighth of each row is padding (attention_mask 0)."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(self.seq_len, dtype=torch.long)
        mask[-self.seq_len // 8 :] = 0
        return {"input_ids": ids, "attention_mask": mask}


class GPT(L.LightningModule):
    def __init__(self, seq_len: int, vocab: int, big: bool) -> None:
        super().__init__()
        width, layers = (768, 12) if big else (128, 4)
        cfg = GPT2Config(
            n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=vocab, n_positions=seq_len
        )
        self.model = GPT2LMHeadModel(cfg)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = self.model(**batch, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.log("val_loss", self.model(**batch, labels=labels).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    opts = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    cuda = torch.cuda.is_available()
    vocab = 50304 if cuda else 512
    torch.manual_seed(0)
    module = GPT(opts.seq_len, vocab, big=cuda)
    train = DataLoader(PaddedTokens(10**5, opts.seq_len, vocab), batch_size=opts.batch_size)
    val = DataLoader(PaddedTokens(2 * opts.batch_size, opts.seq_len, vocab), batch_size=opts.batch_size)

    # On a device mfumon has no peak for (the CPU), MFU is left out and it says how to give one;
    # pass peak_tflops= to get MFU there too.
    callback = MFUCallback()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=opts.steps,
        accumulate_grad_batches=2,
        val_check_interval=20,  # batches: every 10 optimizer steps
        limit_val_batches=2,
        log_every_n_steps=10,
        logger=CSVLogger("runs", name="lightning"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train, val)

    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mfumon/tokens_per_s")]
    print(f"mfumon keys in {trainer.logger.log_dir}/metrics.csv:")
    for r in rows:
        mfu = f"MFU {float(r['mfumon/mfu']) * 100:.1f}% | " if r.get("mfumon/mfu") else ""
        print(
            f"  step {r['step']}: {mfu}{float(r['mfumon/tokens_per_s']):,.0f} tok/s | "
            f"{float(r['mfumon/step_time_ms']):.1f} ms/step"
        )
    print(
        "whole run:",
        {k: round(v, 4) for k, v in callback.monitor.summary().items() if k.startswith("mfumon/")},
    )


if __name__ == "__main__":
    main()
