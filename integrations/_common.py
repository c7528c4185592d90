"""What the Lightning and HF callbacks share: their arguments, token counting, the fault boundary.

Framework-free: imports torch and mfumon only. `CallbackOptions` is the one source of both
callbacks' signatures: each callback class inherits it, so its ``__init__`` is the dataclass's.
The callbacks turn trainer hooks into four calls:
`build` (first training batch), `micro` (each micro-batch, with its own shapes: `batch_shapes`),
`step` (after each optimizer step) and `close` (end of training); `pause`/`resume` bracket
evaluation and checkpointing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import FrozenInstanceError, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfumon.distributed import all_ranks_agree, rank_world
from mfumon.dtypes import normalize_dtype
from mfumon.errors import ConfigError, ConfigTypeError, FaultLog, MfumonWarning, check_int, log
from mfumon.flops import CONVENTIONS
from mfumon.hardware import peak_override_flops
from mfumon.integrations.batches import batch_shapes, batch_tokens, config_seq_len
from mfumon.loggers import Logger, LoggerSet, make_loggers, validate_logger_spec
from mfumon.monitoring import DEFAULT_WARMUP, Monitor, Tokens, default_run_name
from mfumon.recompute import check_recompute

__all__ = ["CallbackCore", "CallbackOptions", "LoggerSpec"]

LoggerSpec = Iterable[str | Logger] | str | Logger | None

NO_TOKENS_HINT = (
    "pass MFUCallback(tokens_per_batch=<tokens in one training batch on one device>) "
    "or MFUCallback(tokens_fn=<function: batch -> tokens>)"
)


@dataclass(eq=False, kw_only=True)
class CallbackOptions:
    """The callbacks' arguments, checked at construction: a bad value raises at once.

    Both `MFUCallback` classes inherit it: their signature is these fields, keyword-only.
    """

    seq_len: int | None = None  # tokens per sequence; None: the first batch's input_ids.shape[-1]
    tokens_per_batch: int | None = None  # tokens in one micro-batch on one device
    tokens_fn: Callable[[Any], Tokens] | None = None  # micro-batch -> tokens (int or 0-d tensor)
    log_every: int | None = None  # optimizer steps per window; None: the trainer's logging cadence
    warmup: int = DEFAULT_WARMUP
    peak_tflops: float | None = None
    dtype: str | torch.dtype | None = None  # None: from the trainer's precision
    loggers: LoggerSpec = ()  # extra mfumon loggers (the trainer's own always get the keys)
    run_name: str | None = None
    log_dir: str | os.PathLike[str] = "runs"
    flops_per_token: int | None = None
    causal: bool = True
    convention: str = "mfumon"
    measure_ceiling: bool = False
    recompute: Any = "auto"  # activation-checkpointing recompute for HFU, as for mfumon.Monitor
    step_shapes: bool = True  # each batch's own documents or sequence length set its attention FLOPs
    self_check: bool = True  # trace one step on fake tensors at setup, as for mfumon.Monitor
    profile_every: int | None = None  # profile one optimizer step in N per component, as for mfumon.Monitor
    expert_load: bool = True  # MoE: tokens per expert from the routers' own top-k, as for mfumon.Monitor

    def __post_init__(self) -> None:
        for name, what in (
            ("seq_len", "tokens per sequence"),
            ("tokens_per_batch", "tokens in one batch on one device"),
            ("log_every", "optimizer steps per log"),
            ("flops_per_token", "training FLOPs per token"),
        ):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), what)
        if self.profile_every is not None:  # 1 would leave no step in the MFU windows
            check_int("profile_every", self.profile_every, "optimizer steps per profiled step", minimum=2)
        check_int("warmup", self.warmup, "steps excluded from averages", minimum=0)
        if not isinstance(self.step_shapes, bool):
            raise ConfigTypeError(f"step_shapes must be True or False, got {self.step_shapes!r}")
        if not isinstance(self.expert_load, bool):
            raise ConfigTypeError(f"expert_load must be True or False, got {self.expert_load!r}")
        if self.tokens_fn is not None and not callable(self.tokens_fn):
            raise ConfigTypeError(
                f"tokens_fn must be a function batch -> tokens, got {type(self.tokens_fn).__name__}"
            )
        if self.tokens_fn is not None and self.tokens_per_batch is not None:
            raise ConfigError("pass tokens_per_batch= or tokens_fn=, not both")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"convention must be one of {list(CONVENTIONS)}, got {self.convention!r}")
        if self.dtype is not None:
            normalize_dtype(self.dtype)
        peak_override_flops(self.peak_tflops)  # raises ConfigError naming peak_tflops
        check_recompute(self.recompute)  # raises ConfigError naming the choices
        self.loggers = tuple(validate_logger_spec(self.loggers))
        self._checked = True  # from here on the arguments are fixed

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTION_NAMES and self.__dict__.get("_checked"):
            raise FrozenInstanceError(f"cannot assign to {name!r}: the callback's arguments are fixed")
        object.__setattr__(self, name, value)

    @property
    def options(self) -> CallbackOptions:
        """The checked arguments (the callback itself holds them)."""
        return self


_OPTION_NAMES = frozenset(f.name for f in fields(CallbackOptions))


class _Gate(Logger):
    """The monitor's one logger on rank 0: fans out to the trainer's and the user's loggers while on."""

    def __init__(self, core: CallbackCore, loggers: list[Logger]) -> None:
        self._core = core
        self._set = LoggerSet(loggers)

    def _call(self, method: str, *args: Any) -> None:
        if not self._core.off:
            self._set.call(method, *args)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log", metrics, step)

    def log_details(self, details: Mapping[str, Any], step: int) -> None:
        self._call("log_details", details, step)

    def log_profile(self, profile: Any, step: int) -> None:
        self._call("log_profile", profile, step)

    def log_warmup(self, metrics: Mapping[str, float], step: int, warmup: int) -> None:
        self._call("log_warmup", metrics, step, warmup)

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        self._call("log_run_info", info)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._call("log_summary", summary)

    def close(self) -> None:
        self._set.call("close")


class CallbackCore:
    """One run's Monitor, built at the first training batch; switches off on any fault.

    After a fault the monitor goes on marking optimizer steps (with 0 tokens) when there are
    several ranks, so the once-per-log reduction stays matched across ranks, but nothing more
    is logged; with one rank it is closed at once.
    """

    def __init__(self, options: CallbackOptions, owner: str) -> None:
        self.options = options
        self._faults = FaultLog()
        self.owner = owner  # names the callback in messages
        self.monitor: Monitor | None = None
        self.off = False
        self._world = 1
        self._has_micro = False
        self._closed = False
        self._shapes = False  # pass each micro-batch's own shapes to the monitor

    # -- setup ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget a previous run (a callback may serve a second fit/train)."""
        self._faults.clear()
        self.close()
        self.monitor = None
        self.off = False
        self._world = 1
        self._has_micro = False
        self._closed = False

    def tokens(self, batch: Any) -> Tokens | None:
        """Tokens of one micro-batch on this rank (a 0-d device tensor stays on the device)."""
        opts = self.options
        if opts.tokens_per_batch is not None:
            return opts.tokens_per_batch
        if opts.tokens_fn is not None:
            return opts.tokens_fn(batch)
        found = batch_tokens(batch)
        return None if found is None else found[0]

    def build(
        self,
        model: nn.Module,
        batch: Any,
        *,
        log_every: int,
        dtype: str | torch.dtype | None,
        sink: Logger,
        tokens_elsewhere: bool = False,
        initial_step: int = 0,
    ) -> tuple[Monitor | None, Tokens | None]:
        """Build and start this run's Monitor at the first batch; also return that batch's tokens.

        The Monitor is None (and the core off, with one message) when it cannot be built.
        `tokens_elsewhere`: the trainer counts tokens itself, so a batch that shows none is fine.
        `initial_step`: optimizer steps the trainer already did (a resumed run continues from there).
        Every rank calls this at its first batch, and all ranks switch on or all stay off: a rank
        that failed alone would leave the others waiting in the reduction.
        """
        problem: str | None = None
        error: BaseException | None = None
        monitor: Monitor | None = None
        tokens: Tokens | None = None
        try:
            tokens = self.tokens(batch)
            problem = self._find_problem(model, batch, tokens is not None or tokens_elsewhere)
            if problem is None:
                monitor = self._new_monitor(model, batch, log_every, dtype, sink, initial_step)
        except Exception as exc:  # setup fault on this rank: every rank must learn of it
            error = exc
        everywhere = all_ranks_agree(problem is None and error is None)  # every rank calls it
        if monitor is None or not everywhere:
            self.off = True
            if monitor is not None:
                monitor.close(failed=True)  # no collective: some rank has no monitor
            if problem is not None:
                self._advise(problem)
            elif error is not None:
                self._report("setup", error)
            return None, None
        self.monitor = monitor.start()
        self._world = rank_world()[1]
        self._shapes = self._wants_shapes() and monitor.breakdown is not None
        return monitor, tokens

    def _find_problem(self, model: nn.Module, batch: Any, has_tokens: bool) -> str | None:
        if not has_tokens:
            return (
                f"mfumon: {self.owner} cannot find the tokens of a training batch (it looks for a dict "
                f"with 'input_ids'/'attention_mask', or an integer (batch, seq) tensor; got "
                f"{type(batch).__name__}); {NO_TOKENS_HINT}. Training goes on without MFU."
            )
        if self._seq_len(model, batch) is None and self.options.flops_per_token is None:
            return (
                f"mfumon: {self.owner} cannot find the sequence length (no input_ids in the batch, no "
                "max_position_embeddings in the model's config); pass MFUCallback(seq_len=<tokens per "
                "sequence>). Training goes on without MFU."
            )
        return None

    def _seq_len(self, model: nn.Module, batch: Any) -> int | None:
        found = batch_tokens(batch)
        return self.options.seq_len or (found[1] if found is not None else None) or config_seq_len(model)

    def _wants_shapes(self) -> bool:
        opts = self.options
        return opts.step_shapes and opts.flops_per_token is None and opts.convention == "mfumon"

    def _setup_docs(self, batch: Any, seq_len: int | None) -> list[int] | None:
        """The first batch's document lengths, for the FLOPs per token reported at setup."""
        docs = batch_shapes(batch).get("doc_lengths") if self._wants_shapes() and seq_len else None
        if docs is None:
            return None
        found = [n for n in docs.tolist() if n > 0]  # host sync: once, at the first batch
        return found if found and max(found) <= seq_len else None

    def _new_monitor(
        self,
        model: nn.Module,
        batch: Any,
        log_every: int,
        dtype: str | torch.dtype | None,
        sink: Logger,
        initial_step: int,
    ) -> Monitor:
        opts = self.options
        run_name = opts.run_name
        loggers: list[Logger] = []
        if rank_world()[0] == 0:  # only rank 0 logs; other ranks build no backend (no W&B run)
            if run_name is None:
                run_name = default_run_name()
            loggers = [sink, *make_loggers(opts.loggers, run_name=run_name, log_dir=Path(opts.log_dir))]
        seq_len = self._seq_len(model, batch)
        return Monitor(
            model,
            seq_len=seq_len,
            doc_lengths=self._setup_docs(batch, seq_len),
            log_every=opts.log_every or log_every,
            warmup=opts.warmup,
            loggers=(_Gate(self, loggers),),
            peak_tflops=opts.peak_tflops,
            dtype=opts.dtype if opts.dtype is not None else dtype,
            run_name=run_name,
            log_dir=opts.log_dir,
            flops_per_token=opts.flops_per_token,
            causal=opts.causal,
            convention=opts.convention,
            measure_ceiling=opts.measure_ceiling,
            recompute=opts.recompute,
            initial_step=initial_step,
            self_check=opts.self_check,
            profile_every=opts.profile_every,
            expert_load=opts.expert_load,
        )

    # -- per step ------------------------------------------------------------------------------
    def micro(self, tokens: Tokens | None, batch: Any = None) -> None:
        """Add one micro-batch's tokens from `tokens()` and its shapes (no host sync; None counts 0)."""
        if self.monitor is not None and not self.off:
            shapes = batch_shapes(batch) if self._shapes and tokens is not None else {}
            self.monitor.micro_step(tokens=0 if tokens is None else tokens, **shapes)
            self._has_micro = True

    def step(self, tokens: Tokens | None = None) -> None:
        """Close one optimizer step (after the optimizer ran)."""
        mon = self.monitor
        if mon is None or self._closed:
            return
        if not self.off:
            mon.step(tokens=tokens if tokens is not None or self._has_micro else 0)
            self._has_micro = False
        elif self._world > 1:
            mon.step(tokens=0)  # keeps the reduction matched across ranks; nothing is logged

    def pause(self) -> None:
        """Exclude what follows (evaluation, checkpointing) from every step."""
        if self.monitor is not None and not self.off:
            self.monitor.pause()

    def resume(self) -> None:
        """Time again after `pause()` (no-op when not paused)."""
        if self.monitor is not None and not self.off:
            self.monitor.resume()

    def close(self, *, failed: bool = False) -> None:
        """Log the last window and the summary, close the loggers (idempotent)."""
        if self.monitor is not None and not self._closed:
            self._closed = True
            self.monitor.close(failed=failed)

    @property
    def closed(self) -> bool:
        """True once `close()` ran for this run's monitor."""
        return self._closed

    # -- faults --------------------------------------------------------------------------------
    def fault(self, hook: str, exc: BaseException) -> None:
        """A hook failed: report once, switch off, never raise into training."""
        if self.off:
            return
        self.off = True
        self._report(hook, exc)
        if self._world <= 1:
            try:
                self.close(failed=True)
            except Exception:  # already reporting a fault; loggers report their own
                pass

    def _report(self, hook: str, exc: BaseException) -> None:
        self._faults.report(
            hook,
            "mfumon: %s failed in %s (%s: %s); MFU is off for the rest of this run, training goes on",
            self.owner,
            hook,
            type(exc).__name__,
            exc,
        )

    def _advise(self, message: str) -> None:
        """Setup advice as a MfumonWarning; logged instead if a warning filter turns it into an error."""
        try:
            warnings.warn(message, MfumonWarning, stacklevel=3)
        except Exception:  # `-W error`: an exception here would stop the training run
            log.warning(message)
