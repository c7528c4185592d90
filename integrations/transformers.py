"""Hugging Face Trainer callback: live MFU/HFU, TFLOP/s, tokens/s and step time in the Trainer's logs.

```python
trainer = Trainer(model, args, train_dataset=ds, callbacks=[MFUCallback()])
```
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from torch import nn

from mfumon.errors import MissingDependencyError, log
from mfumon.integrations._common import CallbackCore, CallbackOptions
from mfumon.loggers import Logger

try:
    from transformers import TrainerCallback as _Callback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    _MISSING = False
except ImportError:  # raised at construction, with the pip command
    _Callback = object  # type: ignore[assignment,misc]
    _MISSING = True

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["MFUCallback"]

DEFAULT_LOG_EVERY = 10  # when the Trainer does not log by steps


def args_dtype(args: TrainingArguments) -> str | None:
    """The matmul dtype the Trainer's arguments ask for; None leaves it to the model and torch settings.

    `args.tf32` is not read here: it only switches torch's fp32 matmuls to TF32 (which the model
    detection sees), and a model with bf16 or fp16 weights still multiplies in bf16/fp16.
    """
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return None


def _counts_tokens(args: TrainingArguments) -> bool:
    """Whether the Trainer counts `state.num_input_tokens_seen` itself."""
    value = getattr(args, "include_num_input_tokens_seen", "no")
    return value not in ("no", False, None)


class _HeldMetrics(Logger):
    """Holds each window's metrics until the Trainer's next `log` call carries them (rank 0 only)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics = dict(metrics)


def _move_before_reporters(callback: Any) -> bool:
    """Place `callback` right after DefaultFlowCallback in the handler that is calling it.

    The Trainer calls callbacks in list order, and `report_to` integrations sit before user
    callbacks; moving ours ahead lets its `on_log` add the mfumon keys to the `logs` dict before
    W&B, TensorBoard, MLflow... read it. The handler is the caller's `self` (a `CallbackHandler`).
    """
    frame: FrameType | None = sys._getframe(1)
    handler = None
    while frame is not None and not isinstance(handler, CallbackHandler):  # a few frames up
        handler = frame.f_locals.get("self")
        frame = frame.f_back
    if not isinstance(handler, CallbackHandler):
        return False
    callbacks = handler.callbacks
    if callback not in callbacks:
        return False
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    target = flow[0] + 1 if flow else 0
    if callbacks.index(callback) > target:
        callbacks.remove(callback)  # safe while call_event iterates: later entries keep their index
        callbacks.insert(target, callback)
    return True


class MFUCallback(CallbackOptions, _Callback):
    """HF Trainer callback adding mfumon's metrics (`mfumon/mfu`, ...) to the Trainer's logs.

    The keys go into the `logs` of the Trainer's log calls, so they land in `state.log_history`
    and reach every `report_to` integration (W&B, TensorBoard, ...). It takes from the Trainer:
    the model (FLOPs per token), `args.bf16`/`fp16` (matmul dtype; TF32 via torch's setting),
    optimizer steps
    (`on_step_end`, after gradient accumulation and the optimizer), the world size
    (torch.distributed), and tokens per micro-batch from the model's inputs, seen by a forward
    pre-hook while the model trains: `attention_mask.sum()` (non-padding) or
    `input_ids.numel()`; else `state.num_input_tokens_seen` when the Trainer counts it. Each
    batch's attention FLOPs follow its own shapes: documents from `cu_seq_lens_q` or packed
    `position_ids` restarts (`DataCollatorWithFlattening`), else its own sequence length (dynamic
    padding), found on the device with no sync. Evaluation and checkpoint saving are not timed. It
    prints nothing unless `loggers=` asks.

    Args:
        seq_len: tokens per sequence, when the inputs do not show it.
        tokens_per_batch: tokens in one micro-batch on one device (instead of counting).
        tokens_fn: function of the model's keyword inputs returning their tokens (int or 0-d tensor).
        log_every: optimizer steps per window (default: `logging_steps` when logging by steps).
        warmup: first optimizer steps left out of averages.
        peak_tflops: per-device dense peak TFLOP/s, overriding the device table.
        dtype: matmul dtype for the peak (default: from `args.bf16`/`fp16`, else the model).
        loggers: extra mfumon loggers ("stdout", "jsonl", "wandb", "tensorboard" or instances).
        run_name, log_dir: where file loggers write.
        flops_per_token, causal, convention, measure_ceiling, recompute: as for `mfumon.Monitor`.
        step_shapes: read each batch's own documents or sequence length (False: the first batch's).
    """

    def __post_init__(self) -> None:
        if _MISSING:
            raise MissingDependencyError(
                "MFUCallback for the HF Trainer needs transformers: pip install 'mfumon[transformers]'"
            ) from None
        super().__post_init__()  # checks every argument
        self._core = CallbackCore(self, "MFUCallback (transformers)")
        self._held = _HeldMetrics()
        self._hook: Any = None
        self._args: Any = None
        self._log_every = DEFAULT_LOG_EVERY
        self._from_state = False  # tokens from state.num_input_tokens_seen (inputs show none)
        self._seen_tokens = 0
        self._initial_step = 0  # state.global_step at train begin: a resumed run counts on

    @property
    def monitor(self) -> Any:
        """This run's `mfumon.Monitor` (None before the first training forward or when off)."""
        return self._core.monitor

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        core = self._core
        try:
            core.reset()
            self._remove_hook()
            self._held.metrics = {}
            self._args = args
            self._initial_step = state.global_step
            self._from_state = False
            self._seen_tokens = state.num_input_tokens_seen
            strategy = getattr(args, "logging_strategy", None)
            by_steps = getattr(strategy, "value", strategy) == "steps"
            self._log_every = self.log_every or (
                int(state.logging_steps) if by_steps and state.logging_steps else DEFAULT_LOG_EVERY
            )
            if model is None:
                raise ValueError("the Trainer passed no model to on_train_begin")
            if not _move_before_reporters(self):
                log.warning(
                    "mfumon: could not place MFUCallback before the Trainer's report_to callbacks; the "
                    "mfumon keys reach state.log_history and later callbacks only"
                )
            self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        except Exception as exc:  # a monitor must never stop a training run
            core.fault("on_train_begin", exc)

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: counts a training micro-batch's tokens; an eval forward pauses timing."""
        core = self._core
        if core.off:
            return
        try:
            if not module.training:
                core.pause()
                return
            if core.monitor is None:  # the first forward: every rank builds, or none does
                built, tokens = core.build(
                    module,
                    kwargs,
                    log_every=self._log_every,
                    dtype=args_dtype(self._args),
                    sink=self._held,
                    tokens_elsewhere=_counts_tokens(self._args),
                    initial_step=self._initial_step,
                )
                if built is None:
                    self._remove_hook()
                    return
                self._from_state = tokens is None  # the Trainer counts them: state.num_input_tokens_seen
            elif not self._from_state:
                tokens = core.tokens(kwargs)
            if not self._from_state:
                core.micro(tokens, kwargs)
        except Exception as exc:
            core.fault("forward pre-hook", exc)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self._core.resume()  # after evaluation or a checkpoint
        except Exception as exc:
            self._core.fault("on_step_begin", exc)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        core = self._core
        if core.monitor is None or core.closed:
            return
        try:
            tokens = None
            if self._from_state:  # global count: all of it on rank 0, so the ranks' sum is right
                seen = state.num_input_tokens_seen
                tokens = (seen - self._seen_tokens) if core.monitor.rank == 0 else 0
                self._seen_tokens = seen
            core.step(tokens)
            if state.max_steps and state.global_step >= state.max_steps:
                core.close()  # the last window now, while the Trainer still logs
            # every rank alike: a Trainer log gathers the loss across ranks
            if core.closed or state.global_step % self._log_every == 0:  # the monitor's cadence
                control.should_log = True
            if control.should_evaluate or control.should_save:
                core.pause()
        except Exception as exc:
            core.fault("on_step_end", exc)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            metrics = self._held.metrics
            if not metrics or logs is None or self._core.off:
                return
            self._held.metrics = {}
            logs.update(metrics)  # the report_to callbacks after us read this dict
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(metrics)  # the Trainer stored a copy before calling us
        except Exception as exc:
            self._core.fault("on_log", exc)

    def _pause(self, hook: str) -> None:
        try:
            self._core.pause()
        except Exception as exc:
            self._core.fault(hook, exc)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pause("on_evaluate")

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pause("on_save")

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pause("on_epoch_end")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self._remove_hook()
            self._core.close()
            if self._held.metrics and not self._core.off:  # stopped early: no Trainer log came after
                state.log_history.append({**self._held.metrics, "step": state.global_step})
                self._held.metrics = {}
        except Exception as exc:
            self._core.fault("on_train_end", exc)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
