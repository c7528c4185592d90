"""Train a small GPT for a few dozen steps with mfumon watching.

Runs on the GPU when there is one (bf16 autocast) and on the CPU otherwise. Prints the live
metrics line, writes runs/<run-name>.jsonl, and logs to W&B too when wandb is installed
(offline, into ./wandb, when no WANDB_API_KEY is set). A device with no datasheet peak (a CPU)
gets its GEMM ceiling measured once at start (about 0.5 s), and MFU against that, labelled measured.

    python examples/train_tiny_gpt.py [--steps 40] [--seq-len 128] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os

import torch
from torch import nn
from torch.nn import functional as F

import mfumon


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT with learned positions and an output head tied to the token embedding."""

    def __init__(
        self, vocab: int, seq_len: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2's init: small logits at step 0
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.ln_f(x))  # (B, T, vocab)


def corpus() -> torch.Tensor:
    """The Zen of Python (stored rot13 in the `this` module, which prints it on import), as char ids."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = "".join(this.d.get(c, c) for c in this.s) * 8
    chars = sorted(set(text))
    return torch.tensor([chars.index(c) for c in text], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--run-name", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = corpus()
    vocab = int(data.max()) + 1
    model = TinyGPT(vocab, args.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    loggers = ["stdout", "jsonl"]
    if importlib.util.find_spec("wandb") is not None and os.environ.get("WANDB_MODE") != "disabled":
        loggers.append("wandb")

    # No datasheet peak for this device (a CPU): measure its GEMM ceiling and show MFU against that.
    no_peak = mfumon.peak_flops(dtype="bf16" if cuda else "fp32", device=device) is None

    with mfumon.monitor(
        model,
        seq_len=args.seq_len,
        log_every=args.log_every,
        loggers=loggers,
        run_name=args.run_name,
        measure_ceiling=no_peak,
    ) as mon:
        for step in range(args.steps):
            starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,))
            batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts]).to(
                device, non_blocking=True
            )
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(tokens=x.numel())
            if step % args.log_every == 0:
                print(f"step {step:3d}  loss {loss.item():.3f}")  # host sync, only for the printout
    print(f"wrote {mon.log_dir / (mon.run_name + '.jsonl')}")
    print(f"plot it: mfumon plot {mon.log_dir / (mon.run_name + '.jsonl')}")


if __name__ == "__main__":
    main()
