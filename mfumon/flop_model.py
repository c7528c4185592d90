"""The monitor's FLOP model: FLOPs per token counted once at setup, HFU refined at the first step.

`FlopModel` turns the monitor's FLOP arguments into `flops_per_token` (MFU numerator) and
`hw_flops_per_token` (HFU numerator). With ``recompute="auto"`` it watches the first training step
with a `mfumon.recompute.RecomputeProbe` and replaces the structural recompute count with what
the step really re-ran; it also says once when checkpointing was switched on after setup. A model with
frozen parameters is watched the same way (`mfumon._grads.GradProbe`): the model FLOPs are counted
again from what needed a gradient in the first training step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mfumon import selfcheck
from mfumon._grads import GradProbe
from mfumon.errors import ConfigError, FaultLog, check_int, log
from mfumon.flops import FlopBreakdown, flop_breakdown
from mfumon.params import ParamCounts, count_params
from mfumon.recompute import RecomputeProbe, find_checkpointing

__all__ = ["FlopModel"]


class FlopModel:
    """Training FLOPs per token of one model (or as given), with recompute for HFU."""

    def __init__(
        self,
        model: nn.Module | None,
        *,
        seq_len: int | None,
        flops_per_token: int | None,
        causal: bool,
        convention: str,
        doc_lengths: Iterable[int] | torch.Tensor | None,
        recompute: Any,
        faults: FaultLog,
        self_check: bool = True,
    ) -> None:
        if model is not None and next(iter(model.parameters()), None) is None and flops_per_token is None:
            raise ConfigError("model has no parameters: pass the model you train, or flops_per_token=")
        self.model = model
        self.seq_len: int | None = None
        self.breakdown: FlopBreakdown | None = None
        self._faults = faults
        self._options = {"causal": causal, "convention": convention, "doc_lengths": doc_lengths}
        self.causal, self.convention = causal, convention  # what per-step shapes are counted under
        self.grads: Any = "auto"  # which inputs need a gradient: by model order until the first step shows it
        self._probe: RecomputeProbe | None = None  # watches the first step for what re-runs
        auto = model is not None and isinstance(recompute, str) and recompute == "auto"
        self._late_check = auto  # say once if checkpointing was enabled after setup
        self._watch = False
        self._grad_probe: GradProbe | None = None  # watches the first step for what needs a gradient
        self._watch_grads = False
        if flops_per_token is not None:
            self.flops_per_token = check_int("flops_per_token", flops_per_token, "training FLOPs per token")
            self.hw_flops_per_token = self.flops_per_token
            if seq_len is not None:
                self.seq_len = check_int("seq_len", seq_len, "tokens per sequence")
            return
        if model is None:
            raise ConfigError("pass the model you train (monitor(model, seq_len=...)) or flops_per_token=")
        if seq_len is None:
            raise ConfigError("seq_len is required: pass seq_len=<tokens per sequence> (e.g. seq_len=2048)")
        self.seq_len = check_int("seq_len", seq_len, "tokens per sequence")
        self.breakdown = flop_breakdown(model, self.seq_len, recompute=recompute, **self._options)
        self.flops_per_token = self.breakdown.total
        self.hw_flops_per_token = self.breakdown.hardware
        self._watch = auto and bool(self.breakdown.recompute)
        self._watch_grads = any(not p.requires_grad for p in model.parameters())
        if self_check:  # one step traced on fake tensors: warns once if the structure misses a part
            selfcheck.self_check(model, self.seq_len, recompute=recompute)

    def watch_first_step(self) -> None:
        """Hook the checkpointed regions to see what the first step re-runs (call last at setup)."""
        if self._watch and self.model is not None and self._probe is None:
            try:
                self._probe = RecomputeProbe(self.model)
            except Exception as exc:
                self._faults.fault("recompute", exc)
        if self._watch_grads and self.model is not None and self._grad_probe is None:
            try:
                self._grad_probe = GradProbe(self.model)
            except Exception as exc:
                self._faults.fault("grads", exc)

    def after_step(self) -> None:
        """Call after each optimizer step: refines recompute once a backward ran; cheap after that."""
        if self._grad_probe is not None:
            self._refine_grads()
        if self._probe is not None:
            self._refine()
        elif self._late_check:
            self._late_check = False
            self._check_late_checkpointing()

    def close(self) -> None:
        """Take the probes' hooks off the model."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._grad_probe is not None:
            self._grad_probe.remove()
            self._grad_probe = None

    def params(self) -> ParamCounts | None:
        """Parameter counts of the model (cached), None when FLOPs were given instead."""
        if self.model is None or self.breakdown is None:
            return None
        return count_params(self.model)

    def _check_late_checkpointing(self) -> None:
        if self.model is None or self.breakdown is None or self.breakdown.recompute:
            return
        try:
            if find_checkpointing(self.model).modules:
                log.warning(
                    "mfumon: activation checkpointing was enabled after the monitor was built, so HFU "
                    "counts no recompute; build the monitor after enabling it, or pass recompute="
                )
        except Exception as exc:
            self._faults.fault("recompute", exc)

    def _refine(self) -> None:
        """Once a backward has run: recompute FLOPs from what it re-ran (early stop included)."""
        probe, model, seq_len = self._probe, self.model, self.seq_len
        if probe is None or model is None or seq_len is None or self.breakdown is None:
            return
        try:
            observed = probe.result()
            if observed is None and not probe.forward_seen:
                return  # no training step through the checkpointed modules yet
            if observed is None:  # they ran, but nothing re-ran where hooks see it (torch.compile)
                log.info("mfumon: no recompute seen in the backward pass; HFU keeps the structural count")
            else:
                refined = flop_breakdown(model, seq_len, recompute=observed, **self._options)
                self.breakdown = replace(self.breakdown, recompute=refined.recompute)
                self.hw_flops_per_token = self.breakdown.hardware
        except Exception as exc:  # keep the structural estimate
            self._faults.fault("recompute", exc)
        self.close()

    def _refine_grads(self) -> None:
        """Once a training forward ran: model FLOPs from what needed a gradient in it (frozen weights)."""
        probe, model, seq_len, before = self._grad_probe, self.model, self.seq_len, self.breakdown
        if probe is None or model is None or seq_len is None or before is None:
            return
        try:
            observed = probe.result()
            if observed is None:
                return  # no training forward yet
            refined = flop_breakdown(model, seq_len, recompute="none", grads=observed, **self._options)
            self.breakdown = replace(refined, recompute=before.recompute)
            self.grads = observed
            self.flops_per_token = self.breakdown.total
            self.hw_flops_per_token = self.breakdown.hardware
            if refined.total != before.total:
                log.info(
                    "mfumon: frozen weights: %s FLOPs per token from what the first step computed "
                    "gradients for (%s by model order)",
                    f"{refined.total:,}",
                    f"{before.total:,}",
                )
        except Exception as exc:  # keep the count by model order
            self._faults.fault("grads", exc)
        probe.remove()
        self._grad_probe = None
