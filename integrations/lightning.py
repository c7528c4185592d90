"""Lightning callback: live MFU/HFU, TFLOP/s, tokens/s and step time, logged to the trainer's loggers.

```python
trainer = L.Trainer(callbacks=[MFUCallback()])
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mfumon.dtypes import normalize_dtype
from mfumon.errors import ConfigError, FaultLog, MissingDependencyError
from mfumon.integrations._common import CallbackCore, CallbackOptions
from mfumon.loggers import Logger

try:
    from lightning.pytorch.callbacks import Callback as _Callback

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # raised at construction, with the pip command
    _Callback = object  # type: ignore[assignment,misc]
    _IMPORT_ERROR = str(exc)

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["MFUCallback"]

DEFAULT_LOG_EVERY = 10  # when the trainer's log_every_n_steps is 0 (Lightning logging off)


def precision_dtype(precision: str | int | None) -> str | None:
    """The matmul dtype of a Lightning precision ("bf16-mixed" -> "bf16"); None for 32-bit or unknown.

    32-bit precision returns None so the monitor reads torch's TF32 setting itself.
    """
    if precision is None:
        return None
    try:
        dtype = normalize_dtype(str(precision))
    except ConfigError:
        return None
    return None if dtype == "fp32" else dtype


def _steps_done(trainer: pl.Trainer) -> int:
    """Batches that ended in an optimizer step so far: the step Lightning logs the next batch's metrics at."""
    # Lightning's logger connector uses this counter (global_step counts each optimizer of a batch);
    # it has no public name, so fall back to global_step.
    step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
    return step if isinstance(step, int) else trainer.global_step


class _TrainerLoggers(Logger):
    """Sends each window to every `trainer.loggers` entry, at Lightning's own step (rank 0 only)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        self._faults = FaultLog()  # one record per failing Lightning logger

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        # mfumon's step k (counted from the steps already done) is the batch Lightning logs at k - 1
        lightning_step = step - 1
        for logger in self._trainer.loggers:
            kind = f"logger {id(logger)}"
            if self._faults.seen(kind):
                continue
            try:
                logger.log_metrics(dict(metrics), step=lightning_step)
            except Exception as exc:  # one broken logger must not silence the others
                self._faults.report(
                    kind,
                    "mfumon: Lightning logger %s raised in log_metrics (%s: %s); it gets no more mfumon "
                    "metrics, training goes on",
                    type(logger).__name__,
                    type(exc).__name__,
                    exc,
                )


class MFUCallback(CallbackOptions, _Callback):
    """Lightning callback logging mfumon's metrics (`mfumon/mfu`, ...) to every logger of the Trainer.

    It takes from the Trainer: the LightningModule (FLOPs per token), `trainer.precision`
    (matmul dtype), optimizer steps (`trainer.global_step`, so gradient accumulation and the
    optimizer's time fall inside one step), the world size (torch.distributed), and tokens per
    micro-batch from the batch: `attention_mask.sum()` (non-padding tokens) or
    `input_ids.numel()` of a dict batch, or an integer (batch, seq) tensor alone or first in a
    tuple. Each batch's attention FLOPs follow its own shapes: documents from `cu_seq_lens_q` or
    packed `position_ids` restarts, else its own sequence length (found on the device, no sync).
    Validation, checkpointing and epoch ends are not timed. It prints nothing unless `loggers=` asks.

    Args:
        seq_len: tokens per sequence, when the batch does not show it.
        tokens_per_batch: tokens in one training batch on one device (instead of counting).
        tokens_fn: function of the training batch returning its tokens (int or 0-d tensor).
        log_every: optimizer steps per window (default: the Trainer's `log_every_n_steps`).
        warmup: first optimizer steps left out of averages.
        peak_tflops: per-device dense peak TFLOP/s, overriding the device table.
        dtype: matmul dtype for the peak (default: from `trainer.precision`).
        loggers: extra mfumon loggers ("stdout", "jsonl", "wandb", "tensorboard" or instances).
        run_name, log_dir: where file loggers write.
        flops_per_token, causal, convention, measure_ceiling, recompute: as for `mfumon.Monitor`.
        step_shapes: read each batch's own documents or sequence length (False: the first batch's).
    """

    def __post_init__(self) -> None:
        if _IMPORT_ERROR is not None:
            raise MissingDependencyError(
                "MFUCallback for Lightning needs lightning: pip install 'mfumon[lightning]'"
            ) from None
        super().__post_init__()  # checks every argument
        self._core = CallbackCore(self, "MFUCallback (Lightning)")
        self._seen_step = 0

    @property
    def monitor(self) -> Any:
        """This run's `mfumon.Monitor` (None before the first training batch or when off)."""
        return self._core.monitor

    # -- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._core.reset()
            self._seen_step = trainer.global_step
        except Exception as exc:  # a monitor must never stop a training run
            self._core.fault("on_fit_start", exc)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        core = self._core
        if core.off:
            return
        try:
            if core.monitor is None:  # the first batch: every rank builds, or none does
                built, tokens = core.build(
                    # FSDPStrategy wraps the module in an FSDP1 root: only that root sizes its shards
                    trainer.model
                    if getattr(trainer.model, "_fsdp_wrapped_module", None) is pl_module
                    else pl_module,
                    batch,
                    log_every=getattr(trainer, "log_every_n_steps", 0) or DEFAULT_LOG_EVERY,
                    dtype=precision_dtype(trainer.precision),
                    sink=_TrainerLoggers(trainer),
                    initial_step=_steps_done(trainer),  # a run resumed from a checkpoint counts on
                )
                if built is None:
                    return
                self._seen_step = trainer.global_step
            else:
                core.resume()  # after validation, a checkpoint or an epoch end
                tokens = core.tokens(batch)
            core.micro(tokens, batch)
        except Exception as exc:
            core.fault("on_train_batch_start", exc)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        try:
            step = trainer.global_step
            if step != self._seen_step:  # the optimizer stepped: accumulation is over
                self._seen_step = step
                self._core.step()
        except Exception as exc:
            self._core.fault("on_train_batch_end", exc)

    def _pause(self, hook: str) -> None:
        try:
            self._core.pause()
        except Exception as exc:
            self._core.fault(hook, exc)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("on_validation_start")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._pause("on_save_checkpoint")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("on_train_epoch_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._core.close()
        except Exception as exc:
            self._core.fault("on_train_end", exc)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self._core.close(failed=True)
        except Exception as exc:
            self._core.fault("on_exception", exc)
