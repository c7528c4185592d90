"""MoE expert load: tokens per expert counted from the routers' own top-k, checked against the test's own
bincounts of the indices the router chose (taken by a forward hook of the test), trained under a
real Monitor; hand arithmetic for expert_load_max and experts_idle."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mfumon
from mfumon import metrics as K
from mfumon.errors import FaultLog
from mfumon.expert_load import TOKENS_DETAIL_MAX, expert_load_source
from tests.conftest import mfumon_records
from tests.procs import exit_now, spawn
from tests.tiny_models import HIDDEN, VOCAB, Expert, HandLM, dispatch, hand_moe_lm, token_batch

E, TOP_K = 4, 2


# --- hand-written MoE: the router hands its choice on, or the experts take it as an argument ------


class ChoosingRouter(nn.Module):
    """Returns (weights, chosen experts), both [tokens, k]; `broken` makes it return the weights only."""

    def __init__(self, d: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, num_experts, bias=False)
        self.k = k
        self.broken = False

    def forward(self, x: torch.Tensor) -> Any:
        weights, chosen = torch.topk(self.proj(x).softmax(dim=-1), self.k, dim=-1)
        return weights if self.broken else (weights, chosen)


class RoutedMoE(nn.Module):
    """Top-k MoE with a ModuleList of experts whose router returns its choice."""

    def __init__(self, d: int = HIDDEN, f: int = 32, num_experts: int = E, k: int = TOP_K) -> None:
        super().__init__()
        self.router = ChoosingRouter(d, num_experts, k)
        self.experts = nn.ModuleList(Expert(d, f) for _ in range(num_experts))
        self.top_k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        got = self.router(flat)
        weights, chosen = got if isinstance(got, tuple) else torch.topk(got, self.top_k, dim=-1)
        return dispatch(self.experts, flat, weights, chosen).view_as(x)


class ArgExperts(nn.Module):
    """Stacked experts [E, d, f], [E, f, d] whose forward takes the chosen experts (`topk_ids`)."""

    def __init__(self, d: int, f: int, num_experts: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, d, f) * 0.05)
        self.w_out = nn.Parameter(torch.randn(num_experts, f, d) * 0.05)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            token, slot = torch.where(topk_ids == e)
            if token.numel():
                y = F.gelu(x[token] @ self.w_in[e]) @ self.w_out[e]
                out.index_add_(0, token, y * weights[token, slot, None])
        return out


class ArgMoE(nn.Module):
    """Top-k MoE whose block takes the top-k itself and hands the indices to its experts."""

    def __init__(self, d: int = HIDDEN, f: int = 16, num_experts: int = E, k: int = TOP_K) -> None:
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = ArgExperts(d, f, num_experts)
        self.top_k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(dim=-1), self.top_k, dim=-1)
        return self.experts(flat, chosen, weights).view_as(x)


def routed_lm(seed: int = 0, moe: Callable[[], nn.Module] = RoutedMoE) -> HandLM:
    torch.manual_seed(seed)
    return HandLM([moe(), moe()])


class Truth:
    """The test's own count: per forward hook, a bincount of the chosen experts `pick` takes from what
    the hooked module saw or returned; only forwards in training mode while `counting` is on."""

    def __init__(self, modules: list[nn.Module], pick: Callable[[nn.Module, Any, Any], torch.Tensor]) -> None:
        self.counting = True
        self.steps: list[list[list[int]]] = []  # per step, per layer, tokens per expert
        self._step: list[torch.Tensor] = [torch.zeros(E, dtype=torch.int64) for _ in modules]
        for layer, module in enumerate(modules):
            module.register_forward_hook(self._hook(layer, pick))

    def _hook(self, layer: int, pick: Callable[[nn.Module, Any, Any], torch.Tensor]) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self.counting and module.training:
                with torch.no_grad():  # saves nothing for backward, like any hook under checkpointing
                    self._step[layer] += torch.bincount(pick(module, args, out).flatten(), minlength=E)

        return hook

    def end_step(self) -> None:
        self.steps.append([c.tolist() for c in self._step])
        self._step = [torch.zeros(E, dtype=torch.int64) for _ in self._step]

    def window(self, first: int, last: int) -> list[list[int]]:
        """Tokens per expert per layer summed over steps first..last (1-based, inclusive)."""
        rows = self.steps[first - 1 : last]
        return [[sum(r[layer][e] for r in rows) for e in range(E)] for layer in range(len(rows[0]))]


def load_max(layers: list[list[int]]) -> float:
    return max(max(c) / (sum(c) / len(c)) for c in layers)


def idle(layers: list[list[int]]) -> int:
    return sum(c.count(0) for c in layers)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int, seq: int, seed: int) -> int:
    idx = token_batch(batch, seq + 1, seed=seed)
    out = model(idx[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return batch * seq


def check_windows(records: list[dict], truth: Truth, log_every: int) -> None:
    """Every JSONL window's counts and keys equal the test's bincounts of the steps since the last log."""
    assert records
    for rec in records:
        want = truth.window(rec["step"] - log_every + 1, rec["step"])
        assert rec["expert_tokens"] == want, rec["step"]
        assert rec[K.EXPERT_LOAD_MAX] == pytest.approx(load_max(want), rel=1e-12)
        assert rec[K.EXPERTS_IDLE] == idle(want)
        assert rec["expert_load_layers"] == [round(max(c) / (sum(c) / len(c)), 4) for c in want]
        assert rec["experts_idle_layers"] == [c.count(0) for c in want]


# --- hand arithmetic ------------------------------------------------------------------------------


def test_keys_by_hand_arithmetic(mfumon_log: pytest.LogCaptureFixture) -> None:
    source = expert_load_source(routed_lm(), FaultLog())
    assert source is not None
    # layer 0: 8 tokens, mean 8/4 = 2, busiest 6 -> 3.0, two idle; layer 1: 2,2,2,2 -> 1.0, none idle
    keys, details = source.metrics(
        {"tokens_per_expert": [6, 2, 0, 0, 2, 2, 2, 2], "ranks_read": [1.0]}, None, 1
    )  # type: ignore[arg-type]
    assert keys == {K.EXPERT_LOAD_MAX: 3.0, K.EXPERTS_IDLE: 2.0}
    assert details == {
        "expert_load_layers": [3.0, 1.0],
        "experts_idle_layers": [2, 0],
        "expert_tokens": [[6, 2, 0, 0], [2, 2, 2, 2]],
        "expert_layers": ["blocks.0.mlp", "blocks.1.mlp"],  # once, on the first window
    }
    # layer 0 routed nothing (not seen): left out of both keys, said once; layer 1: 1,3,0,0 -> 3/1 = 3.0
    keys, details = source.metrics(
        {"tokens_per_expert": [0, 0, 0, 0, 1, 3, 0, 0], "ranks_read": [1.0]}, None, 1
    )  # type: ignore[arg-type]
    assert keys == {K.EXPERT_LOAD_MAX: 3.0, K.EXPERTS_IDLE: 2.0}
    assert details["expert_load_layers"] == [None, 3.0] and "expert_layers" not in details
    said = [r.getMessage() for r in mfumon_records(mfumon_log)]
    assert len(said) == 1 and "blocks.0.mlp" in said[0]
    assert source.metrics({"tokens_per_expert": [math.nan] * 8, "ranks_read": [1.0]}, None, 1) == ({}, {})  # type: ignore[arg-type]
    # one of two ranks' counts still on the way (a GPU's copy not finished): no window's load
    half = {"tokens_per_expert": [6, 2, 0, 0, 2, 2, 2, 2], "ranks_read": [1.0]}
    assert source.metrics(half, None, 2) == ({}, {})  # type: ignore[arg-type]
    source.close()


def test_per_expert_counts_leave_jsonl_above_the_detail_limit() -> None:
    experts = TOKENS_DETAIL_MAX // 2 + 1  # two layers: just over the limit
    torch.manual_seed(0)
    model = HandLM([RoutedMoE(f=2, num_experts=experts), RoutedMoE(f=2, num_experts=experts)])
    source = expert_load_source(model, FaultLog())
    assert source is not None
    counts = [0.0] * (2 * experts)
    counts[0], counts[experts + 1] = 4.0, 2.0
    keys, details = source.metrics({"tokens_per_expert": counts, "ranks_read": [1.0]}, None, 1)  # type: ignore[arg-type]
    assert "expert_tokens" not in details
    assert keys[K.EXPERT_LOAD_MAX] == 4.0 * experts / 4.0  # one expert took all 4: E times the mean
    assert keys[K.EXPERTS_IDLE] == 2 * (experts - 1)
    source.close()


# --- hand-written MoE under a real Monitor --------------------------------------------------------


@pytest.mark.parametrize("moe", [RoutedMoE, ArgMoE], ids=["router-returns-indices", "experts-argument"])
def test_hand_written_moe_counts_equal_the_tests_bincounts(tmp_path: Path, moe: type[nn.Module]) -> None:
    model = routed_lm(moe=moe)
    blocks = [b.mlp for b in model.blocks]
    if moe is RoutedMoE:  # the router's own returned indices
        truth = Truth([b.router for b in blocks], lambda m, a, out: out[1])
    else:  # the gate's logits, top-k taken by the test
        truth = Truth([b.gate for b in blocks], lambda m, a, out: torch.topk(out, TOP_K, dim=-1).indices)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log_every, before = 3, hooks(model)
    with mfumon.monitor(
        model, seq_len=16, log_every=log_every, warmup=log_every, loggers=("jsonl",), peak_tflops=1.0,
        run_name="hand", log_dir=tmp_path,
    ) as mon:  # fmt: skip
        for step in range(1, 10):
            tokens = lm_step(model, opt, batch=3, seq=16, seed=step)
            with mon.paused():  # evaluation in eval mode: no expert load
                truth.counting = False
                model.eval()
                with torch.no_grad():
                    model(token_batch(2, 16, seed=100 + step))
                model.train()
                truth.counting = True
            truth.end_step()
            mon.step(tokens=tokens)
    records = read_jsonl(tmp_path / "hand.jsonl")
    assert [r["step"] for r in records] == [6, 9]
    check_windows(records, truth, log_every)
    assert records[0]["expert_layers"] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(sum(c) == 3 * 3 * 16 * TOP_K for c in records[0]["expert_tokens"])  # 3 steps x 48 tokens x k
    assert hooks(model) == before  # close() removed the monitor's hooks


def test_unreadable_routing_is_said_once_and_left_out(
    tmp_path: Path, mfumon_log: pytest.LogCaptureFixture
) -> None:
    model = hand_moe_lm()  # ListMoE: nn.Linear gate, top-k inside the block's forward
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with mfumon.monitor(model, seq_len=16, log_every=2, warmup=0, peak_tflops=1.0, loggers=()) as mon:
        for step in range(4):
            mon.step(tokens=lm_step(model, opt, batch=2, seq=16, seed=step))
    assert K.MFU in mon.metrics and K.EXPERT_LOAD_MAX not in mon.metrics and K.EXPERTS_IDLE not in mon.metrics
    said = [r.getMessage() for r in mfumon_records(mfumon_log) if "expert load" in r.getMessage()]
    assert said == [
        "mfumon: expert load left out: the routing of MoE layer 'blocks.1.mlp' (ListMoE) cannot be read: "
        "its router returns logits only and the top-k is taken inside the block's forward. It is read from "
        "an experts forward argument named one of top_k_index/router_indices/selected_experts/topk_indices/"
        "topk_idx/topk_ids, or from a router module that returns its chosen indices"
    ]


def test_switched_off_adds_no_hook_and_no_key() -> None:
    model = routed_lm()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with mfumon.monitor(
        model, seq_len=16, log_every=2, warmup=0, peak_tflops=1.0, loggers=(), expert_load=False
    ) as mon:
        assert sum(hooks(b.mlp) for b in model.blocks) == 0  # nothing on the MoE blocks
        for step in range(4):
            mon.step(tokens=lm_step(model, opt, batch=2, seq=16, seed=step))
    assert K.MFU in mon.metrics and K.EXPERT_LOAD_MAX not in mon.metrics


def test_a_router_that_stops_giving_indices_drops_the_keys_once(
    tmp_path: Path, mfumon_log: pytest.LogCaptureFixture
) -> None:
    model = routed_lm()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen: list[bool] = []
    with mfumon.monitor(model, seq_len=16, log_every=2, warmup=0, peak_tflops=1.0, loggers=()) as mon:
        for step in range(1, 9):
            if step == 5:
                model.blocks[0].mlp.router.broken = True  # returns weights only from here on
            mon.step(tokens=lm_step(model, opt, batch=2, seq=16, seed=step))
            if step % 2 == 0:
                seen.append(K.EXPERT_LOAD_MAX in mon.metrics)
    assert seen == [True, True, False, False]  # training went on; the keys left with the indices
    said = [r.getMessage() for r in mfumon_records(mfumon_log) if "expert_load" in r.getMessage()]
    assert len(said) == 1 and "'blocks.0.mlp': the router's output holds 0 integer tensors" in said[0]


# --- two gloo ranks: counts summed over ranks -----------------------------------------------------


def _ranks_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = routed_lm(seed=0)  # the same weights, different data per rank
    truth = Truth([b.mlp.router for b in model.blocks], lambda m, a, out: out[1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with mfumon.monitor(
        model, seq_len=16, log_every=3, warmup=0, peak_tflops=1.0, loggers=("jsonl",), run_name="ranks",
        log_dir=out_dir,
    ) as mon:  # fmt: skip
        for step in range(1, 7):
            tokens = lm_step(model, opt, batch=1 + rank, seq=16, seed=10 * step + rank)
            truth.end_step()
            mon.step(tokens=tokens)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(truth.steps))
    dist.destroy_process_group()
    exit_now()


def test_two_ranks_sum_their_counts(tmp_path: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    spawn(_ranks_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    records = read_jsonl(tmp_path / "ranks.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    for rec in records:
        rows = [s for r in (0, 1) for s in steps[r][rec["step"] - 3 : rec["step"]]]
        want = [[sum(row[layer][e] for row in rows) for e in range(E)] for layer in range(2)]
        assert rec["expert_tokens"] == want
        assert all(sum(c) == 3 * (1 + 2) * 16 * TOP_K for c in want)  # both ranks' tokens
        assert rec[K.EXPERT_LOAD_MAX] == pytest.approx(load_max(want), rel=1e-12)
        assert rec[K.EXPERTS_IDLE] == idle(want)


# --- transformers MoE families (also run on 4.57 by scripts/tf4/run.sh) ---------------------------


def hf_moe(model_type: str, **overrides: Any) -> tuple[nn.Module, list[nn.Module]]:
    """A tiny HF MoE LM (E experts, TOP_K) and its MoE blocks' gates/routers, found by class name."""
    from tests.tiny_models import hf_model

    n = "num_local_experts" if model_type == "mixtral" else "num_experts"
    model = hf_model(model_type, **{n: E, "num_experts_per_tok": TOP_K, **overrides})
    gates = [m.gate for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    assert len(gates) == 2
    return model, gates


def rig(gate: nn.Module, scores: list[float], seed: int = 1) -> None:
    """Gate weight = scores (x) u, frozen: the logits are scores * (u . h), so top-k is fixed by the sign."""
    u = torch.randn(gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gate.weight.copy_(torch.outer(torch.tensor(scores), u / u.norm()))
    gate.weight.requires_grad_(False)


def logits_topk(k: int) -> Callable[[nn.Module, Any, Any], torch.Tensor]:
    """The test's own choice: torch.topk of the gate's logits (5.x routers return them first)."""
    return lambda m, a, out: torch.topk(out[0] if isinstance(out, tuple) else out, k, dim=-1).indices


def train_hf(
    model: nn.Module, tmp_path: Path, name: str, truth: Truth, steps: int = 9, **kw: Any
) -> list[dict]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with mfumon.monitor(
        model, seq_len=16, log_every=3, warmup=3, loggers=("jsonl",), peak_tflops=1.0, run_name=name,
        log_dir=tmp_path, **kw,
    ) as mon:  # fmt: skip
        for step in range(1, steps + 1):
            truth.counting = True
            idx = token_batch(2, 17, seed=step)
            out = model(idx[:, :-1])
            truth.counting = False  # an activation-checkpointing recompute in the backward is no forward
            F.cross_entropy(out.logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            truth.end_step()
            mon.step(tokens=2 * 16)
    return read_jsonl(tmp_path / f"{name}.jsonl")


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_hf_moe_counts_equal_the_routers_topk(tmp_path: Path, model_type: str) -> None:
    pytest.importorskip("transformers")
    model, gates = hf_moe(model_type)
    rig(gates[0], [3.0, 1.0, -1.0, -3.0])  # every token of layer 0 goes to experts {0, 1} or {2, 3}
    truth = Truth(gates, logits_topk(TOP_K))
    records = train_hf(model, tmp_path, model_type, truth)
    assert [r["step"] for r in records] == [6, 9]
    check_windows(records, truth, 3)
    for rec in records:
        first = rec["expert_tokens"][0]
        assert first[0] == first[1] and first[2] == first[3] and sum(first) == 3 * 32 * TOP_K


@pytest.mark.transformers
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_moe_with_activation_checkpointing_counts_each_forward_once(
    tmp_path: Path, reentrant: bool
) -> None:
    pytest.importorskip("transformers")
    model, gates = hf_moe("mixtral")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    truth = Truth(gates, logits_topk(TOP_K))
    records = train_hf(model, tmp_path, "ckpt", truth, recompute="none")
    check_windows(records, truth, 3)
    assert all(sum(c) == 3 * 32 * TOP_K for rec in records for c in rec["expert_tokens"])


@pytest.mark.transformers
def test_hf_moe_idle_experts_by_construction(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model, gates = hf_moe("qwen3_moe", num_experts_per_tok=1)
    for gate in gates:  # top-1 of scores * z: expert 0 when z > 0, expert 3 when z < 0; 1 and 2 never
        rig(gate, [2.0, 1.0, -1.0, -2.0])
    truth = Truth(gates, logits_topk(1))
    records = train_hf(model, tmp_path, "idle", truth)
    check_windows(records, truth, 3)
    for rec in records:
        assert rec[K.EXPERTS_IDLE] == 2 * 2  # experts 1 and 2 in both layers
        loads = [max(c) / (sum(c) / E) for c in rec["expert_tokens"]]
        assert rec[K.EXPERT_LOAD_MAX] == max(loads) >= 2.0  # half the experts take every token


@pytest.mark.transformers
def test_hf_trainer_callback_passes_expert_load_through(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from mfumon.errors import ConfigTypeError
    from mfumon.integrations.transformers import MFUCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = token_batch(1, 16, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    keys = {}
    for on in (True, False):
        model, _ = hf_moe("mixtral")
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out{on}"), max_steps=6, per_device_train_batch_size=2,
            logging_steps=2, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0,
        )  # fmt: skip
        cb = MFUCallback(peak_tflops=1.0, warmup=2, expert_load=on)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb])
        trainer.train()
        logs = [e for e in trainer.state.log_history if K.MFU in e]
        assert len(logs) >= 2
        keys[on] = set(logs[-1])
    assert {K.EXPERT_LOAD_MAX, K.EXPERTS_IDLE} <= keys[True]
    assert K.MFU in keys[False] and not {K.EXPERT_LOAD_MAX, K.EXPERTS_IDLE} & keys[False]
    with pytest.raises(ConfigTypeError, match="expert_load must be True or False"):
        MFUCallback(expert_load="yes")  # type: ignore[arg-type]


@pytest.mark.transformers
def test_hf_deepseek_v3_counts_follow_the_bias_corrected_choice(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.tiny_models import hf_model

    model = hf_model("deepseek_v3")  # 4 routed experts, top-2, first layer dense: 2 MoE layers
    gates = [m.gate for m in model.modules() if type(m).__name__ == "DeepseekV3MoE"]
    assert len(gates) == 2
    for gate in gates:  # the correction bias alone puts expert 3 in every token's choice
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))

    def chosen(m: nn.Module, a: Any, out: Any) -> torch.Tensor:  # the router's own returned indices
        (indices,) = [t for t in out if not t.is_floating_point()]  # 5.x (logits, w, idx); 4.57 (idx, w)
        return indices

    truth = Truth(gates, chosen)
    records = train_hf(model, tmp_path, "dsv3", truth)
    check_windows(records, truth, 3)
    for rec in records:
        assert all(c[3] == 3 * 32 for c in rec["expert_tokens"])  # every token of 3 steps x 32
        assert rec[K.EXPERT_LOAD_MAX] == pytest.approx(2.0)  # 96 of 192 choices, mean 48


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the copy to the host without a wait")
def test_on_a_gpu_the_counts_reach_the_host_without_a_sync(tmp_path: Path) -> None:
    model = routed_lm().cuda()
    truth = Truth([b.mlp.router for b in model.blocks], lambda m, a, out: out[1].cpu())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    keep: dict[int, dict] = {}
    counted: list[int] = []

    class Keep(mfumon.Logger):
        def log(self, metrics, step):  # type: ignore[no-untyped-def]
            keep[step] = dict(metrics)

        def log_details(self, details, step):  # type: ignore[no-untyped-def]
            counted.append(sum(sum(layer) for layer in details["expert_tokens"]))

    steps, log_every = 12, 3
    with mfumon.monitor(
        model, seq_len=16, log_every=log_every, warmup=0, loggers=(Keep(),), peak_tflops=989.5
    ) as mon:
        for step in range(1, steps + 1):
            idx = token_batch(3, 17, seed=step).cuda()
            F.cross_entropy(model(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            truth.end_step()
            torch.cuda.set_sync_debug_mode("error")  # the step's mark and every log: no host sync
            try:
                mon.step(tokens=3 * 16)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert K.EXPERT_LOAD_MAX in keep[steps]  # the counts reached the host, a log late at most
    total = sum(sum(sum(layer) for layer in s) for s in truth.steps)
    assert total == steps * 3 * 16 * TOP_K * len(model.blocks)
    per_step = total // steps  # each window's counts are whole steps' (the copies lag, never split)
    assert counted and all(c % per_step == 0 for c in counted) and sum(counted) <= total


def test_a_setup_that_fails_leaves_no_hook_on_the_model(tmp_path: Path) -> None:
    model = routed_lm()
    before = hooks(model)
    with pytest.raises(mfumon.ConfigError, match="profile_every"):  # fails after the FLOP count
        mfumon.Monitor(model, loggers=(), flops_per_token=1000, peak_tflops=1.0, profile_every=5)
    assert hooks(model) == before  # neither the expert-load hooks nor the input-wait marks stayed
