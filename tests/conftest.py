from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mfumon.devices import faults
from mfumon.hardware import ENV_PEAK_TFLOPS


class TinyLM(nn.Module):
    """Embedding -> two Linear layers -> output head: a real (if attention-free) language model."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.emb(idx)))


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: int = 4, seq: int = 8, vocab: int = 32
) -> int:
    """One real optimizer step on random tokens; returns the tokens it processed."""
    idx = torch.randint(0, vocab, (batch, seq + 1))
    logits = model(idx[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return batch * seq


@pytest.fixture
def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


@pytest.fixture
def mfumon_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog set to capture the `mfumon` logger at WARNING and above."""
    caplog.set_level(logging.WARNING, logger="mfumon")
    return caplog


def mfumon_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The captured records of the `mfumon` logger."""
    return [r for r in caplog.records if r.name == "mfumon"]


@pytest.fixture
def fresh_device_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No device or peak from the environment, and device faults not yet reported in this process."""
    for var in ("CUDA_VISIBLE_DEVICES", ENV_PEAK_TFLOPS):
        monkeypatch.delenv(var, raising=False)
    faults.clear()  # "reported once" is per process; each test starts fresh
    yield
    faults.clear()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MFUMON_PEAK_TFLOPS", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
