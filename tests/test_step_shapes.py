"""Per-step shapes: `step(doc_lengths=..., seq_len=...)` sets that step's attention FLOPs, never synced.

Expected numbers are hand arithmetic on the tiny Llama of tests/tiny_models.py (hidden 64, 4 query
heads of 16, 2 K/V heads, MLP 96, 2 layers, vocabulary 128, untied head), written out once here:

- matmul weights: per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288 and MLP 3*64*96 =
  18,432; two layers 61,440; lm_head 64*128 = 8,192; total 69,632 -> 6 x = 417,792 per token;
  norm scales (2 per layer + final) 5*64 = 320 -> 6 x = 1,920: NON_ATTN = 419,712 per token.
- attention: 6 x 4 heads x (16 + 16) = 768 FLOPs per key per layer, 2 layers: PER_KEY = 1,536;
  a causal document of n tokens attends n(n+1)/2 keys.

and, for the non-causal count, on FlopCounterMode run on each document alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.flops import step_attention_flops
from mfumon.measure import measure_flops
from mfumon.steps import doc_lengths_from_cu_seqlens, doc_lengths_from_positions
from tests.procs import exit_now, spawn
from tests.tiny_models import hf_model, token_batch

pytest.importorskip("transformers")

NON_ATTN = 6 * (2 * (4096 + 2048 + 2048 + 4096 + 3 * 64 * 96) + 64 * 128) + 6 * 5 * 64
PER_KEY = 2 * 6 * 4 * (16 + 16)
S = 32  # the monitor's setup seq_len
SETUP_ATTN = PER_KEY * (S * (S + 1) // 2) // S  # one causal row of 32: 528 keys over 32 tokens


def causal(n: int) -> int:
    return n * (n + 1) // 2  # keys of one causal document: 1 + 2 + ... + n


def run_flops(mon: mfumon.Monitor) -> tuple[float, float, dict]:
    """(model FLOPs, tokens) of the whole run from its summary: TFLOP/s x seconds, world size 1."""
    summary = mon.summary()
    return summary[K.TFLOPS_PER_DEVICE] * 1e12 * summary["seconds"], summary["tokens"], summary


def new_monitor(model: torch.nn.Module, **kw: object) -> mfumon.Monitor:
    options: dict = dict(seq_len=S, loggers=(), peak_tflops=1.0, warmup=0, log_every=100)
    options.update(kw)
    return mfumon.Monitor(model, **options)


def train(model: torch.nn.Module, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
    """One real forward and backward of the model on `ids` (the monitor only marks the step)."""
    kw = {} if position_ids is None else {"position_ids": position_ids}
    model(input_ids=ids, labels=ids, **kw).loss.backward()


# --- the formula ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerWithCausal(mfumon.AttentionShape):
    causal: bool | None = None  # a layer that says itself whether it is causal


def test_step_attention_flops_by_hand() -> None:
    layer = mfumon.AttentionShape(heads=2, qk_head_dim=8, v_head_dim=4)  # 6 * 2 * (8 + 4) = 144 per key
    slide = mfumon.AttentionShape(heads=2, qk_head_dim=8, v_head_dim=4, window=4)
    docs = [3, 5]
    assert step_attention_flops(docs, [layer]) == 144 * (6 + 15)  # causal: 3*4/2 + 5*6/2
    assert step_attention_flops(docs, [slide]) == 144 * (6 + 1 + 2 + 3 + 4 + 4)  # min(i, 4), i = 1..5
    assert step_attention_flops(docs, [layer], causal=False) == 144 * (9 + 25)  # n * n
    # bidirectional window: (query, key) pairs less than 4 apart; n = 5 has 25 less the 2 pairs 4 apart
    assert step_attention_flops(docs, [slide], causal=False) == 144 * (9 + 23)
    bidirectional = LayerWithCausal(heads=2, qk_head_dim=8, v_head_dim=4, causal=False)
    assert step_attention_flops(docs, [layer, bidirectional]) == 144 * (21 + 34)  # its own flag wins
    as_default = LayerWithCausal(heads=2, qk_head_dim=8, v_head_dim=4, causal=None)
    assert step_attention_flops(docs, [as_default], causal=False) == 144 * 34  # None: the default
    on_device = step_attention_flops(torch.tensor([3, 0, 5], dtype=torch.int32), [layer, slide])
    assert on_device.dtype == torch.float64 and on_device.ndim == 0  # zeros count nothing
    assert on_device.item() == 144 * (21 + 6 + 14)


def test_document_lengths_from_positions_and_offsets() -> None:
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert doc_lengths_from_positions(packed).tolist() == [3, 0, 0, 2, 0, 4, 0, 0, 0]
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])  # each row starts a document
    assert doc_lengths_from_positions(rows).tolist() == [4, 0, 0, 0, 2, 0, 2, 0]
    from_two = torch.tensor([[2, 3, 4, 2, 3]])  # RoBERTa-style positions start at 2: a reset still shows
    assert doc_lengths_from_positions(from_two).tolist() == [3, 0, 0, 2, 0]
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)  # DataCollatorWithFlattening's cu_seq_lens_q
    assert doc_lengths_from_cu_seqlens(cu).tolist() == [3, 2, 4]


# --- the monitor ---------------------------------------------------------------------------------


def test_each_step_counts_its_own_documents() -> None:
    model = hf_model("llama")
    mon = new_monitor(model)
    assert mon.breakdown is not None and mon.breakdown.total == NON_ATTN + SETUP_ATTN  # the setup count
    mon.start()
    steps = [  # (tokens, shapes, attention FLOPs of the step by hand)
        (32, {"doc_lengths": [8, 24]}, PER_KEY * (causal(8) + causal(24))),
        (32, {"doc_lengths": torch.tensor([4, 4, 4, 4, 16])}, PER_KEY * (4 * causal(4) + causal(16))),
        (32, {}, 32 * SETUP_ATTN),  # no shapes: the setup's per token
        (64, {"seq_len": 16}, PER_KEY * 4 * causal(16)),  # four rows of 16
        (torch.tensor(16), {"doc_lengths": torch.tensor([5, 11])}, PER_KEY * (causal(5) + causal(11))),
    ]
    for tokens, shapes, _ in steps:
        train(model, token_batch(1, int(tokens)))
        mon.step(tokens=tokens, **shapes)
    mon.close()
    flops, tokens, _ = run_flops(mon)
    assert tokens == 32 + 32 + 32 + 64 + 16
    assert flops == pytest.approx(tokens * NON_ATTN + sum(attn for *_, attn in steps), rel=1e-12)


def test_non_causal_documents_match_flop_counter_mode_on_each_document() -> None:
    model = hf_model("llama")
    docs = [5, 11]
    # FlopCounterMode, each document run alone: every score of each document, matmuls at 6 per weight;
    # it counts no elementwise work, so the norm scales (6 x 320 per token) are added by hand.
    alone = [token_batch(1, n) for n in docs]
    measured = sum(measure_flops(model, {"input_ids": ids, "labels": ids}) for ids in alone)
    for module in model.modules():  # the model says its attention is bidirectional: every key counts
        if hasattr(module, "is_causal"):
            module.is_causal = False
    mon = new_monitor(model)
    mon.start()
    train(model, token_batch(1, sum(docs)))
    mon.step(tokens=sum(docs), doc_lengths=torch.tensor(docs))
    mon.close()
    flops, tokens, _ = run_flops(mon)
    # rel 1e-4: on transformers 4.x FlopCounterMode also counts the rotary embedding's (8 x 1) @ (1 x s)
    # matmul, forward only: 16 FLOPs per token (0.004% here); on 5.x it is no matmul and the match exact.
    assert flops == pytest.approx(measured + 6 * 320 * tokens, rel=1e-4)


def test_frozen_layers_documents_match_flop_counter_mode_on_each_document() -> None:
    # Frozen lower half: its attention runs no backward where Q, K and V need no gradient; a step's own
    # documents must be counted with the same flags as the model's count (FlopCounterMode on each
    # document alone sees what autograd really runs).
    model = hf_model("llama")
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[: len(model.model.layers) // 2].requires_grad_(False)
    for module in model.modules():  # bidirectional, so FlopCounterMode's full score matrix is the count
        if hasattr(module, "is_causal"):
            module.is_causal = False
    docs = [5, 11]
    measured = sum(
        measure_flops(model, {"input_ids": ids, "labels": ids}) for ids in (token_batch(1, n) for n in docs)
    )
    # Norm scales by the frozen-weight rule (docs/accounting.md), 2 x (1 + weight trained + input needs a
    # gradient): frozen ones 2 (nothing trained before them), the first trained layer's input norm 4 (its
    # input comes from frozen layers), the rest 6. FlopCounterMode counts no elementwise work.
    layers = model.model.layers
    half = len(layers) // 2
    norm_flops = 2 * sum(
        n.weight.numel()
        for layer in layers[:half]
        for n in (layer.input_layernorm, layer.post_attention_layernorm)
    )
    norm_flops += (
        4 * layers[half].input_layernorm.weight.numel()
        + 6 * layers[half].post_attention_layernorm.weight.numel()
    )
    norm_flops += 6 * sum(
        n.weight.numel()
        for layer in layers[half + 1 :]
        for n in (layer.input_layernorm, layer.post_attention_layernorm)
    )
    norm_flops += 6 * model.model.norm.weight.numel()
    mon = new_monitor(model, warmup=1)
    mon.start()
    train(model, token_batch(1, sum(docs)))
    mon.step(tokens=sum(docs))  # the first step shows what needs a gradient; left out as warm-up
    train(model, token_batch(1, sum(docs)))
    mon.step(tokens=sum(docs), doc_lengths=torch.tensor(docs))
    mon.close()
    flops, tokens, _ = run_flops(mon)
    assert flops == pytest.approx(measured + norm_flops * tokens, rel=1e-4)


def test_micro_steps_add_up_their_shapes() -> None:
    model = hf_model("llama")
    mon = new_monitor(model)
    mon.start()
    for _ in range(2):
        mon.micro_step(tokens=16, doc_lengths=torch.tensor([16]))
        mon.micro_step(tokens=16)  # no shapes: the setup's attention per token
        mon.step(tokens=32, seq_len=8)  # its own part: four rows of 8
    mon.close()
    flops, tokens, _ = run_flops(mon)
    attention = PER_KEY * causal(16) + 16 * SETUP_ATTN + PER_KEY * 4 * causal(8)
    assert tokens == 2 * 64
    assert flops == pytest.approx(2 * (64 * NON_ATTN + attention), rel=1e-12)


def test_recompute_scales_with_the_steps_model_flops() -> None:
    model = hf_model("llama")
    mon = new_monitor(model, recompute=0.5)  # HFU re-runs half the forward
    ratio = mon.hw_flops_per_token / mon.flops_per_token
    assert ratio > 1.1
    mon.start()
    for docs in ([8, 24], [1] * 32, [32]):
        mon.step(tokens=32, doc_lengths=docs)
    mon.close()
    flops, tokens, summary = run_flops(mon)
    assert flops == pytest.approx(tokens * NON_ATTN + PER_KEY * (causal(8) + causal(24) + 32 + causal(32)))
    assert summary[K.HFU] / summary[K.MFU] == pytest.approx(ratio, rel=1e-12)  # docs/monitor.md


@pytest.mark.parametrize(
    ("shapes", "error", "match"),
    [
        ({"doc_lengths": [8, 0]}, ConfigError, "ints >= 1"),
        ({"doc_lengths": [8, -1]}, ConfigError, "ints >= 1"),
        ({"doc_lengths": [8.0, 24]}, ConfigError, "ints >= 1"),
        ({"doc_lengths": [True]}, ConfigError, "ints >= 1"),
        ({"doc_lengths": []}, ConfigError, "ints >= 1"),
        ({"doc_lengths": 32}, ConfigTypeError, "list of ints"),
        ({"doc_lengths": torch.ones(2, 16, dtype=torch.long)}, ConfigError, "1-D integer tensor"),
        ({"doc_lengths": torch.tensor([8.0, 24.0])}, ConfigError, "1-D integer tensor"),
        ({"doc_lengths": torch.zeros(0, dtype=torch.long)}, ConfigError, "non-empty"),
        ({"seq_len": 0}, ConfigError, "seq_len"),
        ({"seq_len": 16.0}, ConfigTypeError, "seq_len"),
        ({"doc_lengths": [16], "seq_len": 16}, ConfigError, "not both"),
    ],
)
def test_bad_shapes_fail_at_once_and_add_nothing(shapes: dict, error: type, match: str) -> None:
    mon = new_monitor(hf_model("llama")).start()
    with pytest.raises(error, match=match):
        mon.step(tokens=32, **shapes)
    with pytest.raises(error, match=match):
        mon.micro_step(tokens=32, **shapes)
    mon.step(tokens=7)  # the failed calls added nothing: one step of 7 tokens at the setup count
    mon.close()
    flops, tokens, summary = run_flops(mon)
    assert summary["steps"] == 1 and tokens == 7
    assert flops == pytest.approx(7 * (NON_ATTN + SETUP_ATTN), rel=1e-12)


def test_shapes_need_a_counted_model() -> None:
    fixed = mfumon.Monitor(flops_per_token=1000, loggers=(), peak_tflops=1.0, device="cpu")
    with pytest.raises(ConfigError, match="flops_per_token="):
        fixed.step(tokens=32, doc_lengths=[32])
    palm = new_monitor(hf_model("llama"), convention="palm")
    with pytest.raises(ConfigError, match="convention='mfumon'"):
        palm.step(tokens=32, seq_len=32)
    with pytest.raises(ConfigError, match="tokens="):
        new_monitor(hf_model("llama")).step(doc_lengths=[32])


# --- no host sync --------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value on the host (`.item()`, `float()`, `int()`, `bool()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_tensor_shapes_are_read_at_log_time_only() -> None:
    model = hf_model("llama")
    mon = new_monitor(model, log_every=3)
    mon.start()
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])  # documents of 5 and 11
    with HostReads() as between_logs:
        for _ in range(2):
            mask = torch.ones(1, 16, dtype=torch.long)
            mon.step(tokens=mask.sum(), doc_lengths=doc_lengths_from_positions(positions))
    assert between_logs.reads == 0  # nothing read on the host in step(): on CUDA no sync either
    with HostReads() as at_log:
        mon.step(tokens=torch.tensor(16), doc_lengths=torch.tensor([5, 11]))  # step 3 logs
    assert at_log.reads >= 6  # three steps' tokens and extra FLOPs, read now
    mon.close()
    flops, tokens, _ = run_flops(mon)
    assert flops == pytest.approx(tokens * NON_ATTN + 3 * PER_KEY * (causal(5) + causal(11)), rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode is CUDA's")
def test_cuda_shapes_are_never_synced_per_step() -> None:
    model = hf_model("llama").cuda()
    mon = new_monitor(model, log_every=1000)
    mon.start()
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], device="cuda")
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for _ in range(3):
            tokens = torch.ones(1, 16, dtype=torch.long, device="cuda").sum()
            mon.step(tokens=tokens, doc_lengths=doc_lengths_from_positions(positions))
            mon.micro_step(tokens=tokens, doc_lengths=doc_lengths_from_cu_seqlens(cu))
            mon.step(tokens=tokens, seq_len=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
    flops, tokens, _ = run_flops(mon)
    attention = 3 * (2 * PER_KEY * (causal(5) + causal(11)) + PER_KEY * causal(16))
    assert tokens == 3 * 48 and flops == pytest.approx(tokens * NON_ATTN + attention, rel=1e-12)


# --- two ranks -----------------------------------------------------------------------------------

RANK_DOCS = {0: [8, 24], 1: [4] * 8}  # each rank's documents per step: 32 tokens on each


def _two_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with new_monitor(hf_model("llama"), log_every=4) as mon:
        for _ in range(4):
            mon.step(tokens=torch.tensor(32), doc_lengths=torch.tensor(RANK_DOCS[rank]))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(mon.summary()))
    dist.destroy_process_group()
    exit_now()


def test_two_ranks_sum_their_own_shapes(tmp_path: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    spawn(_two_rank_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # every rank holds the global figures
        summary = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert summary["world_size"] == 2 and summary["tokens"] == 2 * 4 * 32
        flops = summary[K.TFLOPS_PER_DEVICE] * 1e12 * summary["seconds"] * 2
        attention = 4 * PER_KEY * (causal(8) + causal(24) + 8 * causal(4))
        assert flops == pytest.approx(2 * 4 * 32 * NON_ATTN + attention, rel=1e-12)
