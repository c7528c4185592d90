"""The callbacks find each batch's own shapes: packed documents and dynamic padding, in real Trainers.

Expected FLOPs per token are hand arithmetic on the tiny Llama (NON_ATTN, PER_KEY: see
tests/test_step_shapes.py): a packed step costs NON_ATTN per token plus PER_KEY x n(n+1)/2 per
causal document of n tokens; a padded batch of rows of length s costs NON_ATTN + PER_KEY x
s(s+1)/2 / s per counted token. The logged FLOPs per token are TFLOP/s over tokens/s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mfumon import metrics as K
from tests.test_step_shapes import NON_ATTN, PER_KEY, causal
from tests.tiny_models import VOCAB, hf_model

pytestmark = pytest.mark.transformers

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments  # noqa: E402

from mfumon.integrations.transformers import MFUCallback as HFCallback  # noqa: E402

DOCS = [12, 60, 30, 45, 8, 52, 20, 37]  # document lengths; any order packs to the same sum


def packed_flops_per_token(docs: list[int]) -> float:
    return NON_ATTN + PER_KEY * sum(causal(n) for n in docs) / sum(docs)


def row(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Documents(Dataset):
    def __len__(self) -> int:
        return len(DOCS)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": row(DOCS[i], i)}


def hf_args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    options.update(kw)
    return TrainingArguments(**options)


def logged_flops_per_token(logs: list[dict[str, Any]]) -> list[float]:
    return [e[K.TFLOPS_PER_DEVICE] * 1e12 / e[K.TOKENS_PER_S_PER_DEVICE] for e in logs if K.MFU in e]


@pytest.mark.parametrize(
    "collator",
    [
        {},  # input_ids, labels, position_ids restarting at 0 per document
        {"return_flash_attn_kwargs": True, "return_position_ids": False},  # cu_seq_lens_q only
    ],
    ids=["position_ids", "cu_seq_lens_q"],
)
def test_hf_trainer_on_flattened_documents(tmp_path: Path, collator: dict[str, Any]) -> None:
    cb = HFCallback(peak_tflops=1.0, warmup=0)
    trainer = Trainer(
        model=hf_model("llama", attn="sdpa"),
        args=hf_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, logging_steps=2),
        train_dataset=Documents(),  # one epoch: 2 steps x 2 micro-batches x 2 documents
        data_collator=DataCollatorWithFlattening(**collator),
        callbacks=[cb],
    )
    trainer.train()
    (logged,) = logged_flops_per_token(trainer.state.log_history)
    expected = packed_flops_per_token(DOCS)
    assert logged == pytest.approx(expected, rel=1e-9)  # the issue asks for 1%; it is exact
    one_row = NON_ATTN + PER_KEY * causal(sum(DOCS[:2])) / sum(DOCS[:2])  # a packed row as one sequence
    assert abs(one_row - expected) / expected > 0.05  # what it would read without per-step shapes


class PaddedStream(IterableDataset):
    """Rows of known lengths in a fixed order (an iterable dataset: the Trainer does not shuffle it)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __iter__(self) -> Any:
        for i, n in enumerate(self.lengths):
            yield {"input_ids": row(n, i)}


def pad_to_longest(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Dynamic padding: each batch padded to its own longest row (pad id 2, attention_mask 0)."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), 2)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def padded_flops_per_token(batches: list[tuple[int, int]]) -> float:
    """(tokens, padded length) per batch: each batch's tokens at its own sequence length."""
    flops = sum(tokens * (NON_ATTN + PER_KEY * causal(s) / s) for tokens, s in batches)
    return flops / sum(tokens for tokens, _ in batches)


def test_hf_trainer_with_dynamic_padding(tmp_path: Path) -> None:
    lengths = [10, 6, 40, 33, 20, 20, 5, 60]  # batches of 2: padded to 10, 40, 20, 60
    cb = HFCallback(peak_tflops=1.0, warmup=0)
    trainer = Trainer(
        model=hf_model("llama", attn="sdpa"),
        args=hf_args(tmp_path, max_steps=4, logging_steps=4),
        train_dataset=PaddedStream(lengths),
        data_collator=pad_to_longest,
        callbacks=[cb],
    )
    trainer.train()
    (logged,) = logged_flops_per_token(trainer.state.log_history)
    assert logged == pytest.approx(padded_flops_per_token([(16, 10), (73, 40), (40, 20), (65, 60)]), rel=1e-9)


L = pytest.importorskip("lightning")
from mfumon.integrations.lightning import MFUCallback as LightningCallback  # noqa: E402


class LlamaModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = hf_model("llama", attn="sdpa")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch, labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def lightning_fit(batches: list[dict[str, torch.Tensor]], tmp_path: Path, **kw: Any) -> LightningCallback:
    cb = LightningCallback(peak_tflops=1.0, warmup=0, **kw)
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(LlamaModule(), DataLoader(batches, batch_size=None))  # each item is a whole batch
    return cb


def summary_flops_per_token(cb: LightningCallback) -> float:
    summary = cb.monitor.summary()
    return summary[K.TFLOPS_PER_DEVICE] * 1e12 * summary["seconds"] / summary["tokens"]


def packed_batches() -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(0, len(DOCS), 2):
        docs = DOCS[i : i + 2]
        ids = torch.tensor([row(sum(docs), i)])
        positions = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)  # restart per document
        batches.append({"input_ids": ids, "position_ids": positions})
    return batches


def test_lightning_on_packed_rows(tmp_path: Path) -> None:
    cb = lightning_fit(packed_batches(), tmp_path)
    assert summary_flops_per_token(cb) == pytest.approx(packed_flops_per_token(DOCS), rel=1e-9)
    # the count reported at setup is the first batch's: documents of 12 and 60
    assert cb.monitor.flops_per_token == pytest.approx(packed_flops_per_token(DOCS[:2]), abs=1)


def test_step_shapes_off_keeps_the_first_batch_as_one_row(tmp_path: Path) -> None:
    cb = lightning_fit(packed_batches(), tmp_path, step_shapes=False)
    first = DOCS[0] + DOCS[1]  # the first packed row, counted as one sequence of 72 for every step
    assert summary_flops_per_token(cb) == pytest.approx(NON_ATTN + PER_KEY * causal(first) / first, rel=1e-5)
    with pytest.raises(TypeError, match="step_shapes"):
        LightningCallback(step_shapes="yes")  # type: ignore[arg-type]


def test_lightning_with_dynamic_padding(tmp_path: Path) -> None:
    lengths = [10, 6, 40, 33, 20, 20, 5, 60]
    features = [{"input_ids": row(n, i)} for i, n in enumerate(lengths)]
    batches = [pad_to_longest(features[i : i + 2]) for i in range(0, len(features), 2)]
    for b in batches:
        del b["labels"]
    cb = lightning_fit(batches, tmp_path)
    expected = padded_flops_per_token([(16, 10), (73, 40), (40, 20), (65, 60)])
    assert summary_flops_per_token(cb) == pytest.approx(expected, rel=1e-9)
