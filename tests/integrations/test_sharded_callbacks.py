"""The Lightning callback on FSDP1 as ``FSDPStrategy`` sets it up, 2 ranks under torchrun on the CPU.

Each rank writes what its callback's monitor counts (FLOPs per token and the run facts the loggers
get) next to the count of the same model unwrapped; they must be equal.

The HF Trainer's ``fsdp="full_shard"`` cannot run here: on the CPU accelerate keeps the FSDP plugin
only for accelerator distributed types (``AcceleratorState.__init__`` in accelerate/state.py sets
``DistributedType.FSDP`` inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ...]``,
which leaves out ``MULTI_CPU``), so the Trainer silently trains with DDP instead. What its
callback sees under FSDP (the unwrapped model inside the FSDP root, counted in the first training
forward) is tested on hand-wrapped FSDP1 in tests/test_sharded.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mfumon.flops import flop_breakdown
from mfumon.params import count_params
from mfumon.recompute import observe_recompute
from tests.procs import exit_now, run
from tests.tiny_models import hf_model

SEQ, BATCH = 16, 2


class Tokens(Dataset):
    """Random token rows of length SEQ."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _expected() -> dict[str, int]:
    """FLOPs per token of the unwrapped tiny Llama (tied head), its decoder layers checkpointed as
    the strategy's policy does; recompute as one training step of it re-runs (early stop included)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = hf_model("llama", tie_word_embeddings=True)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    batch = {k: v[None] for k, v in Tokens()[0].items()}
    observed = observe_recompute(model, lambda: model(**batch, use_cache=False).loss.backward())
    flops = flop_breakdown(model, SEQ, recompute=observed)
    return {"flops_per_token": flops.total, "hw_flops_per_token": flops.hardware}


def _write(out_dir: str, monitor: Any, trained: torch.nn.Module) -> None:
    """What the callback's monitor counted on this rank, and how the trainer sharded the model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank = torch.distributed.get_rank()
    info = monitor.run_info()
    seen = {
        "units": sum(isinstance(m, FSDP) and m._handle is not None for m in trained.modules()),
        "local": sum(p.numel() for p in trained.parameters()),
        "total": count_params(hf_model("llama", tie_word_embeddings=True)).total,
        "flops_per_token": monitor.flops_per_token,
        "hw_flops_per_token": monitor.hw_flops_per_token,
        "run_info": {k: v for k, v in info.items() if "flops" in k},
        "expected": _expected(),
    }
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))


def lightning_main(scenario: str, out_dir: str) -> None:
    """One rank of a Lightning FSDPStrategy fit (launched by torchrun, see `_torchrun`)."""
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mfumon.integrations.lightning import MFUCallback

    class Llama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf_model("llama", tie_word_embeddings=True)

        def configure_model(self) -> None:
            if scenario == "configure_model":  # wrapped by hand: the strategy leaves the root alone
                self.model = FSDP(
                    self.model,
                    auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                    use_orig_params=True,
                    device_id=torch.device("cpu"),
                )

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch, use_cache=False).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDPStrategy, wrapping the LightningModule as it does on GPUs, but on the CPU. Lightning's
        `_setup_model` gives FSDP `device_id=self.root_device.index`, None on the CPU, and FSDP1
        refuses that ("FSDP needs a non-CPU accelerator device"; torch/distributed/fsdp/
        _init_utils.py, _init_device_handle); here the same root wrap gets the CPU as its device,
        then Lightning's own `_setup_model` takes it as wrapped. A subclass also passes the
        Trainer's check that FSDPStrategy runs on CUDA (a `type(...) is FSDPStrategy` test)."""

        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            if scenario == "strategy":
                policy = self.kwargs.get("auto_wrap_policy")
                kwargs = {k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"}
                model = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), **kwargs)
            return super()._setup_model(model)

    cb = MFUCallback(peak_tflops=1.0, warmup=0, log_every=2)
    strategy = CPUFSDPStrategy(
        auto_wrap_policy={LlamaDecoderLayer},
        activation_checkpointing_policy={LlamaDecoderLayer},
        process_group_backend="gloo",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=4,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Llama(), DataLoader(Tokens(), batch_size=BATCH))
    _write(out_dir, cb.monitor, trainer.model)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    exit_now()


def _torchrun(main: str, scenario: str, tmp_path: Path) -> Any:
    script = tmp_path / "rank.py"
    root = Path(__file__).resolve().parents[2]
    script.write_text(
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        f"from tests.integrations.test_sharded_callbacks import {main}\n"
        f"{main}(sys.argv[1], sys.argv[2])\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return run([*torchrun, str(script), scenario, str(tmp_path)], check=True)


def _check(tmp_path: Path) -> None:
    for rank in range(2):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        expected = seen["expected"]
        assert seen["units"] == 3  # the trainer wrapped the root and each of the 2 decoder layers
        assert seen["local"] < seen["total"]  # each rank holds about half
        assert seen["flops_per_token"] == expected["flops_per_token"]
        assert seen["hw_flops_per_token"] > seen["flops_per_token"]  # the layers re-run
        assert seen["hw_flops_per_token"] == expected["hw_flops_per_token"]
        assert seen["run_info"]["flops_per_token"] == expected["flops_per_token"]  # what the loggers get


@pytest.mark.parametrize("scenario", ["strategy", "configure_model"])
def test_lightning_fsdp_strategy_counts_the_full_model(tmp_path: Path, scenario: str) -> None:
    pytest.importorskip("lightning")
    _torchrun("lightning_main", scenario, tmp_path)
    _check(tmp_path)
