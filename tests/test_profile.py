"""`mfumon.profile_step`: one real training step of tiny HF models, timed per component on the CPU."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mfumon
from mfumon import metrics as K
from mfumon.roofline import roofline
from tests.test_recompute import enable_hf
from tests.tiny_models import HIDDEN, HandLM, ListMoE, hf_model, token_batch

S, B = 32, 4  # tokens per sequence, sequences per step
FAMILIES = ("gpt2", "llama", "mixtral")


def trainer(kind: str) -> tuple[nn.Module, Any, dict[str, float]]:
    """A tiny model, a step function (forward, backward, AdamW step) and the step's own wall clock."""
    model = hf_model(kind, attn="eager" if kind == "gpt2" else "sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)
    clock: dict[str, float] = {}

    def step() -> None:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        clock["seconds"] = time.perf_counter() - start

    step()  # the first step allocates AdamW's state: not what a profiled step in a run looks like
    return model, step, clock


@pytest.mark.parametrize("kind", FAMILIES)
def test_rows_add_up_to_the_flop_model_and_the_step(kind: str) -> None:
    model, step, clock = trainer(kind)
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    expected = mfumon.flop_breakdown(model, S).total * B * S  # the MFU numerator of this step
    assert sum(r.flops for r in profile.rows) == pytest.approx(expected, rel=0.005)
    assert sum(r.seconds for r in profile.rows) == pytest.approx(profile.seconds, rel=1e-9)
    # the marks sit just outside step_fn: the step measured around it, within 5%
    assert profile.seconds == pytest.approx(clock["seconds"], rel=0.05)
    names = {r.name for r in profile.rows}
    assert {"attention projections", "attention core", "lm_head + loss", "optimizer", "other"} <= names
    layers = ("model.layers.0.mlp", "model.layers.1.mlp")  # the two MoE blocks: a row each
    moe_rows = {f"{c} {p}" for c in ("routed experts", "router") for p in layers}
    assert (moe_rows <= names) == (kind == "mixtral")
    assert all(r.seconds >= 0 and r.bytes >= 0 for r in profile.rows)
    assert profile.row("optimizer").bytes > 0  # AdamW: params, grads, two moments


def test_components_split_like_the_breakdown() -> None:
    model, step, _ = trainer("mixtral")
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    b, tokens = mfumon.flop_breakdown(model, S), B * S
    assert profile.row("attention core").flops == b.attn_scores * tokens
    layers = ("model.layers.0.mlp", "model.layers.1.mlp")
    routers = [profile.row(f"router {p}") for p in layers]
    experts = [profile.row(f"routed experts {p}") for p in layers]
    assert sum(r.flops for r in routers) == b.router * tokens  # each layer an equal share
    # 2 layers x 4 experts x 3 matrices of 64 x 96, each token in 2 of 4 experts: 6 x weights x 2/4
    routed = 2 * 4 * 3 * 64 * 96
    assert [r.flops for r in experts] == [6 * routed * 2 // 4 * tokens / 2] * 2
    # with 256 token-slots over 4 experts, every expert's weights are read (3 x fp32 bytes each)
    assert sum(r.bytes for r in experts) > 3 * routed * 4
    assert all(r.seconds > 0 for r in (*routers, *experts))  # each layer's own time, measured


SLOWED = {  # family -> (module class name whose forward the test slows, the row it must top)
    "llama": ("LlamaMLP", "mlp"),
    "gpt2": ("GPT2Attention", "attention core"),
    "mixtral": ("MixtralExperts", "routed experts model.layers.1.mlp"),  # the test slows layer 1 only
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_slowed_component_tops_the_table(kind: str) -> None:
    model, step, _ = trainer(kind)
    cls, row = SLOWED[kind]
    slowed = [m for m in model.modules() if type(m).__name__ == cls]
    if kind == "mixtral":  # one MoE layer slowed: its own row tops the table, not the other layer's
        slowed = slowed[1:]
    assert slowed
    handles = [m.register_forward_hook(lambda *_: time.sleep(0.25)) for m in slowed]  # inside its forward
    try:
        profile = mfumon.profile_step(
            model, step, seq_len=S, tokens=B * S, peak_tflops=1.0, bandwidth_gbs=20.0
        )
    finally:
        for h in handles:
            h.remove()
    top = profile.sorted_rows()[0]
    assert top.name == row
    assert top.seconds >= 0.25 * len(slowed)
    assert profile.table().splitlines()[1].startswith(row)  # the table's first row is where to work


def test_profiled_step_leaves_no_hook_and_trains_the_same() -> None:
    model, step, _ = trainer("llama")
    twin, twin_step, _ = trainer("llama")
    mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    twin_step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # the hooks read, never change, the step
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_roofline_arithmetic() -> None:
    # 1e12 FLOPs over 1e9 bytes in 2 s; peak 1e12 FLOP/s, 1e11 B/s: intensity 1000 FLOP/B,
    # ceiling min(1e12, 1000 x 1e11) = 1e12; least time max(1 s, 0.01 s) = 1 s; lost 1 s; fraction 0.5
    out = roofline(1e12, 1e9, 2.0, 1e12, 1e11)
    assert out == {
        "tflops": 0.5,
        "intensity": 1000.0,
        "ceiling_tflops": 1.0,
        "fraction": 0.5,
        "time_lost": 1.0,
    }
    # memory bound: 1e9 FLOPs over 1e9 bytes: ceiling 1 x 1e11 = 1e11 FLOP/s, least time 0.01 s
    mem = roofline(1e9, 1e9, 0.02, 1e12, 1e11)
    assert mem["ceiling_tflops"] == pytest.approx(0.1) and mem["time_lost"] == pytest.approx(0.01)
    # no FLOPs (the optimizer): bytes / bandwidth is its least time
    assert roofline(0.0, 1e9, 0.05, 1e12, 1e11)["time_lost"] == pytest.approx(0.04)
    assert roofline(1e9, 1e9, 0.02, None, None)["time_lost"] is None  # no ceiling: nothing claimed
    assert roofline(1e9, 1e9, 0.02, 1e11, None)["time_lost"] == pytest.approx(0.01)  # compute roof alone


def test_table_and_record_shape() -> None:
    model, step, _ = trainer("gpt2")
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S, peak_tflops=1.0, bandwidth_gbs=20.0)
    record = profile.as_dict()
    assert record["peak_tflops"] == 1.0 and record["bandwidth_gbs"] == 20.0
    assert record["seconds"] == profile.seconds
    assert {"name", "flops", "bytes", "seconds", "time_lost"} <= set(record["rows"][0])
    lost = [r.time_lost for r in profile.sorted_rows()]
    assert lost == sorted(lost, reverse=True)
    assert "host clock (CPU)" in profile.table()


def test_a_compiled_model_says_what_it_could_not_separate() -> None:
    model, step, _ = trainer("llama")
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)

    def compiled_step() -> None:
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    compiled_step()
    profile = mfumon.profile_step(compiled, compiled_step, seq_len=S, tokens=B * S)
    merged = [r for r in profile.rows if r.name.startswith("compiled: ")]
    assert len(merged) == 1 and "not separated" in merged[0].note
    assert "attention core" in merged[0].name and "mlp" in merged[0].name
    assert not {"attention core", "mlp"} & {r.name for r in profile.rows}  # never guessed apart
    expected = mfumon.flop_breakdown(model, S).total * B * S
    assert sum(r.flops for r in profile.rows) == pytest.approx(expected, rel=0.005)


def test_a_module_multiplying_its_own_weights_joins_their_rows() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_tiny_gpt import TinyGPT  # nn.MultiheadAttention: in_proj_weight is the module's own

    model = TinyGPT(128, 32, d_model=64, n_layers=2, n_heads=4)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 128, (2, 32))

    def step() -> None:
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()

    profile = mfumon.profile_step(model, step, seq_len=32, tokens=64)
    joined = profile.row("attention core + attention projections")
    assert joined is not None and "not separable" in joined.note and joined.seconds > 0
    assert profile.row("attention projections") is None  # not shown apart with a time it does not have
    assert sum(r.flops for r in profile.rows) == pytest.approx(
        mfumon.flop_breakdown(model, 32).total * 64, rel=0.005
    )


def test_forwards_rerun_by_checkpointing_stay_in_their_rows() -> None:
    model, _, _ = trainer("llama")
    enable_hf(model, use_reentrant=False)  # activation checkpointing of every decoder layer
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    # re-run forwards inside backward would end the backward early and pour its time into "other"
    # (about half the step); attributed right, "other" is the few percent outside model and optimizer
    assert profile.row("other").seconds < 0.25 * profile.seconds
    assert profile.row("mlp").seconds > 0 and profile.row("attention projections").seconds > 0


def test_layers_compiled_in_place_join_their_parents_row() -> None:
    model, step, _ = trainer("llama")
    for layer in model.model.layers:
        layer.compile(backend="eager")
    step()
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    (merged,) = [r for r in profile.rows if r.name.startswith("compiled: ")]
    assert "model.layers.0" in merged.note and merged.seconds > 0
    assert {"attention core", "mlp", "norms & elementwise"} <= set(
        merged.name.removeprefix("compiled: ").split(" + ")
    )
    assert profile.row("lm_head + loss") is not None  # outside the compiled layers: still its own row
    expected = mfumon.flop_breakdown(model, S).total * B * S
    assert sum(r.flops for r in profile.rows) == pytest.approx(expected, rel=0.005)


def test_bad_arguments_fail_fast() -> None:
    model, step, _ = trainer("llama")
    with pytest.raises(mfumon.ConfigError, match="tokens"):
        mfumon.profile_step(model, step, seq_len=S, tokens=0)
    with pytest.raises(mfumon.ConfigTypeError, match="step_fn"):
        mfumon.profile_step(model, None, seq_len=S, tokens=8)  # type: ignore[arg-type]
    with pytest.raises(mfumon.ConfigError, match="bandwidth_gbs"):
        mfumon.profile_step(model, step, seq_len=S, tokens=8, bandwidth_gbs=-1.0)


# --- in the monitor -----------------------------------------------------------------------------


class Profiles(mfumon.Logger):
    """Keeps what the monitor sends: profiles by step, and the windows' step times."""

    def __init__(self) -> None:
        self.profiles: dict[int, Any] = {}
        self.windows: list[int] = []

    def log_profile(self, profile: Any, step: int) -> None:
        self.profiles[step] = profile

    def log(self, metrics: Any, step: int) -> None:
        self.windows.append(step)


def hook_count(model: nn.Module) -> int:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks + sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


def test_monitor_profiles_one_step_in_n_outside_the_windows(tmp_path: Any) -> None:
    model, _, _ = trainer("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)
    seen = Profiles()
    loggers = (seen, "jsonl")
    with mfumon.monitor(
        model,
        seq_len=S,
        log_every=6,
        warmup=1,
        profile_every=4,
        loggers=loggers,
        log_dir=tmp_path,
        run_name="r",
        peak_tflops=1.0,
    ) as mon:
        base = hook_count(model)  # the monitor's own first-forward hooks
        counts = []
        for _ in range(12):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=B * S)
            counts.append(hook_count(model))
    assert sorted(seen.profiles) == [4, 8, 12]
    # armed after steps 3, 7, 11 (for 4, 8, 12), removed after those: no hook on the other steps
    assert [c > base for c in counts] == [i in (3, 7, 11) for i in range(1, 13)]
    assert hook_count(model) == 0  # close removed everything
    profile = seen.profiles[8]
    assert sum(r.flops for r in profile.rows) == pytest.approx(mon.flops_per_token * B * S, rel=0.005)
    assert profile.peak_flops == 1e12
    # 12 steps - 1 warm-up - 3 profiled = 8 timed steps in the windows
    assert mon.summary()["steps"] == 8
    import json

    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    profiled = [r for r in records if "profile" in r]
    assert [r["step"] for r in profiled] == [4, 8, 12]
    rows = profiled[0]["profile"]["rows"]
    assert {"name", "flops", "bytes", "seconds", "time_lost"} <= set(rows[0])
    assert profiled[0]["profile"]["peak_tflops"] == 1.0
    assert sum(r["seconds"] for r in rows) == pytest.approx(profiled[0]["profile"]["seconds"])
    windows = [r for r in records if "profile" not in r]
    assert all(r[K.GOODPUT] > 0.9 for r in windows)  # a profiled step is no paused time (it read 0.67)
    assert mon.summary()["paused_s"] < 0.1 * mon.summary()["wall_s"]


def test_a_pause_inside_the_profiled_step_voids_it_and_the_next_step_is_profiled() -> None:
    model, _, _ = trainer("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)
    seen = Profiles()
    with mfumon.monitor(
        model, seq_len=S, log_every=4, warmup=0, profile_every=4, loggers=seen, peak_tflops=1.0
    ) as mon:
        for step in range(1, 9):
            if step == 4:  # an evaluation before step 4's work: the armed step holds a pause
                with mon.paused():
                    time.sleep(0.2)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=B * S)
    assert sorted(seen.profiles) == [5, 8]  # step 4's profile was void: step 5 was profiled instead
    assert all(p.seconds < 0.2 for p in seen.profiles.values())  # no evaluation in any profile
    assert hook_count(model) == 0


def test_a_failing_profile_is_reported_once_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    from tests.tiny_models import ListMoE

    model, _, _ = trainer("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = token_batch(B, S)
    seen = Profiles()
    with mfumon.monitor(
        model, seq_len=S, log_every=2, warmup=0, profile_every=2, loggers=seen, peak_tflops=1.0
    ) as mon:
        # the model changes after setup: an MoE whose top_k the walk cannot find (kept as `k`)
        model.model.layers[0].mlp = ListMoE(64, 32, num_experts=4, top_k=2, top_k_attr="k")
        for _ in range(6):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=B * S)
    faults = [r for r in caplog.records if "profile fault" in r.getMessage()]
    assert len(faults) == 1 and "switched off" in faults[0].getMessage()
    assert seen.profiles == {}
    assert seen.windows == [2, 4, 6]  # every window logged: no step left untimed
    assert hook_count(model) == 0


def test_profile_every_needs_a_model_and_a_positive_n() -> None:
    for every in (0, 1):  # 1 would profile every step: no step left in the MFU windows
        with pytest.raises(mfumon.ConfigError, match="profile_every must be an int >= 2"):
            mfumon.Monitor(
                nn.Linear(4, 4), seq_len=4, profile_every=every, loggers=(), peak_tflops=1.0, self_check=False
            )
    with pytest.raises(mfumon.ConfigError, match="profile_every needs the model"):
        mfumon.Monitor(flops_per_token=6, profile_every=3, loggers=(), peak_tflops=1.0)


def test_the_table_shows_the_rows_that_lose_most_and_counts_the_rest() -> None:
    model, step, _ = trainer("mixtral")
    profile = mfumon.profile_step(model, step, seq_len=S, tokens=B * S)
    ranked = profile.sorted_rows()
    lines = profile.table(limit=3).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == [r.name.split()[0] for r in ranked[:3]]
    rest_ms = sum(r.seconds for r in ranked[3:]) * 1e3
    assert lines[4] == f"... {len(ranked) - 3} more rows, {rest_ms:.3f} ms together"
    assert len(profile.table().splitlines()) > len(lines)  # the default shows every row of this model


def test_experts_in_a_module_list_are_timed_as_experts_not_as_the_router() -> None:
    """A ModuleList is never called (its hooks never fire): each expert in it is timed instead."""
    torch.manual_seed(0)
    model = HandLM([ListMoE(HIDDEN, 2 * HIDDEN, 4, 2), ListMoE(HIDDEN, 2 * HIDDEN, 4, 2)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    idx = token_batch(4, 33)

    def step() -> None:
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    step()
    slowed = [h.register_forward_hook(lambda *_: time.sleep(0.05)) for h in model.blocks[1].mlp.experts]
    try:
        profile = mfumon.profile_step(model, step, seq_len=32, tokens=4 * 32)
    finally:
        for h in slowed:
            h.remove()
    experts = {r.name: r for r in profile.rows if r.name.startswith("routed experts")}
    assert set(experts) == {"routed experts blocks.0.mlp", "routed experts blocks.1.mlp"}
    assert all(r.seconds > 0 for r in experts.values())
    assert profile.sorted_rows()[0].name == "routed experts blocks.1.mlp"  # 4 x 50 ms in its experts
    assert profile.row("router blocks.1.mlp").seconds < 0.05  # the sleep is not the router's
    expected = mfumon.flop_breakdown(model, 32).total * 4 * 32
    assert sum(r.flops for r in profile.rows) == pytest.approx(expected, rel=0.005)
