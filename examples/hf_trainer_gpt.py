"""Train a small GPT-2 with the Hugging Face Trainer for a few dozen steps, with mfumon's callback.

Random weights from a config (no download), random tokens with some padding. Runs on the GPU
when there is one (bf16) and on the CPU otherwise, in under a minute. The mfumon keys join the
Trainer's own log lines and `trainer.state.log_history`, and reach every `report_to`
integration (TensorBoard here, when installed, under runs/hf/tb); gradient accumulation 2,
evaluation every 10 optimizer steps left out of the timing.

    python examples/hf_trainer_gpt.py [--steps 40] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from mfumon.integrations.transformers import MFUCallback


class PaddedTokens(Dataset):
    """Random token rows; the last eighth of each row is padding (attention_mask 0, label -100)."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(self.seq_len, dtype=torch.long)
        mask[-self.seq_len // 8 :] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    opts = parser.parse_args()

    cuda = torch.cuda.is_available()
    vocab = 50304 if cuda else 512
    width, layers = (768, 12) if cuda else (128, 4)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=vocab, n_positions=opts.seq_len
    )
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", "runs/hf/tb")
    args = TrainingArguments(
        output_dir="runs/hf",
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=2,
        learning_rate=3e-4,
        bf16=cuda,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="no",
        report_to=["tensorboard"] if tensorboard else [],
        disable_tqdm=True,
    )
    # On a device mfumon has no peak for (the CPU), MFU is left out and it says how to give one;
    # pass peak_tflops= to get MFU there too.
    callback = MFUCallback()
    trainer = Trainer(
        model=GPT2LMHeadModel(cfg),
        args=args,
        train_dataset=PaddedTokens(10**5, opts.seq_len, vocab),
        eval_dataset=PaddedTokens(2 * opts.batch_size, opts.seq_len, vocab),
        callbacks=[callback],
    )
    trainer.train()

    print("mfumon keys in trainer.state.log_history:")
    for entry in trainer.state.log_history:
        if "mfumon/tokens_per_s" in entry:
            mfu = f"MFU {entry['mfumon/mfu'] * 100:.1f}% | " if "mfumon/mfu" in entry else ""
            print(
                f"  step {entry['step']}: {mfu}{entry['mfumon/tokens_per_s']:,.0f} tok/s | "
                f"{entry['mfumon/step_time_ms']:.1f} ms/step"
            )


if __name__ == "__main__":
    main()
