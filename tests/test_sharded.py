"""Sharded models count at full size, on 2 gloo processes: FSDP1 (by hand), FSDP2, DeepSpeed ZeRO-3.

Each rank counts the model before wrapping (the expected numbers: the unwrapped model, a plain
module the rest of the suite checks against FlopCounterMode) and after, and the two must be equal:
`count_params` and `flop_breakdown`, with activation checkpointing for the recompute term.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mfumon.errors import ConfigError
from mfumon.flops import flop_breakdown
from mfumon.params import count_params
from tests.procs import exit_now, run, spawn
from tests.tiny_models import hand_moe_lm, hf_model

SEQ = 32

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counts(model: nn.Module) -> dict[str, Any]:
    """What must not change when the model is sharded: parameter counts and FLOPs per token."""
    return {
        "params": count_params(model, cache=False).__dict__,
        "flops": flop_breakdown(model, SEQ).__dict__,
    }


def _tied_llama() -> nn.Module:
    """A tiny Llama whose lm_head is tied to its embedding: the tie must survive the sharding."""
    return hf_model("llama", tie_word_embeddings=True)


def _checkpoint_layers(model: nn.Module, layer_cls: type) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_cls))


def _fsdp1_worker(rank: int, world: int, port: int, out_dir: str, orig: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plain = _tied_llama()
        _checkpoint_layers(plain, LlamaDecoderLayer)
        before = _counts(plain)
        model = _tied_llama()
        wrapped = FSDP(  # one FlatParameter per decoder layer, one at the root (embedding, norm, head)
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            use_orig_params=orig,
            device_id=torch.device("cpu"),  # FSDP1 runs on the CPU when told so
        )
        _checkpoint_layers(wrapped, LlamaDecoderLayer)
        flats = [m for m in wrapped.modules() if isinstance(m, FSDP) and m._handle is not None]
        local = sum(p.numel() for p in wrapped.parameters())
        # what the HF Trainer's callback sees: the model inside the FSDP root (the Trainer hands its
        # callbacks the unwrapped model), counted in its first training forward, when the root unit's
        # parameters are unsharded views and the decoder layers' units still sharded
        in_forward: list[dict[str, Any]] = []
        hook = model.register_forward_pre_hook(lambda m, args: in_forward.append(_counts(m)))
        ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(rank))
        wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        hook.remove()
        try:  # first the model inside the root FSDP unit, as a callback given it would
            inner: Any = _counts(model)
        except ConfigError as exc:
            inner = str(exc)
        after = _counts(wrapped)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            result = {"before": before, "after": after, "inner": inner, "in_forward": in_forward}
            json.dump({**result, "local": local, "units": len(flats)}, f)
    finally:
        dist.destroy_process_group()
    exit_now()  # reached only when nothing raised


@pytest.mark.parametrize("orig", [False, True], ids=["flat_params", "use_orig_params"])
def test_fsdp1_counts_at_full_size(tmp_path: Path, orig: bool) -> None:
    spawn(_fsdp1_worker, (2, _port(), str(tmp_path), orig), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["units"] == 3  # the root and each of the 2 decoder layers hold a FlatParameter
        assert result["after"] == result["before"]
        assert result["in_forward"] == [result["before"]]
        if orig:  # the root unit's FlatParameter, which alone knows the full shapes, is out of reach
            assert "use_orig_params=True" in result["inner"]
            assert "pass the FSDP-wrapped model" in result["inner"]
        else:  # the root unit's FlatParameter is registered on the model it wraps
            assert result["inner"] == result["before"]
        params = result["before"]["params"]
        assert params["lm_head"] == params["embedding"] == 128 * 64  # tied: the head is the table
        assert params["matmul_active"] == params["total"]  # embedding left out, its tied head counted
        assert result["before"]["flops"]["recompute"] > 0  # the checkpointed layers re-run
        assert result["local"] < params["total"]  # each rank holds about half


def _fsdp2_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.tiny_models import Block

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plain = hand_moe_lm()
        _checkpoint_layers(plain, Block)
        before = _counts(plain)
        model = hand_moe_lm()
        _checkpoint_layers(model, Block)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() for p in model.parameters())
        after = _counts(model)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"before": before, "after": after, "local": local}, f)
    finally:
        dist.destroy_process_group()
    exit_now()  # reached only when nothing raised


def test_fsdp2_dtensor_parameters_count_at_full_size(tmp_path: Path) -> None:
    spawn(_fsdp2_worker, (2, _port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["after"] == result["before"]  # DTensor global shape, no communication
        assert result["before"]["flops"]["recompute"] > 0
        assert result["local"] < result["before"]["params"]["total"]  # each rank holds about half


_ZERO3_SCRIPT = """
import deepspeed
import deepspeed.ops
from tests.procs import exit_now
from tests.test_sharded import _counts
from tests.tiny_models import hand_moe_lm

# Without this, init_distributed JIT-compiles DeepSpeed's shared-memory CPU all-reduce with g++
# (about 40 s on a fresh machine, and a build killed half-way leaves a lock the next one waits on
# for ever). ZeRO-3's partitioning never calls it; DeepSpeed falls back to torch.distributed.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
expected = _counts(hand_moe_lm())
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 2}):
    sharded = hand_moe_lm()
assert all(p.numel() == 0 for p in sharded.parameters()), "ZeRO-3 should leave empty local tensors"
assert sum(p.ds_tensor.numel() for p in sharded.parameters()) < expected["params"]["total"]  # a part each
got = _counts(sharded)
assert got == expected, (got, expected)
print("ok", flush=True)
exit_now()
"""


def test_deepspeed_zero3_parameters_count_at_full_size(tmp_path: Path) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        missing = "deepspeed is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{missing} (CI installs the dev extra, so this test must run there)")
        pytest.skip(missing)
    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    out = run([*torchrun, f"--master-port={_port()}", str(script)], env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.count("ok") == 2, out.stderr[-3000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
