"""``mfumon estimate``: parameter counts and training FLOPs per token of a config.json.

The model is built on the meta device (no memory, no weights) with transformers'
``AutoModelForCausalLM.from_config`` and measured with the same code the monitor uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfumon.errors import ConfigError, MfumonError, MissingDependencyError
from mfumon.flops import CONVENTIONS, FlopBreakdown, flop_breakdown
from mfumon.params import ParamCounts, count_params

__all__ = ["add_parser", "build_meta_model", "run"]

_DROPPED_KEYS = ("quantization_config",)  # a quantized checkpoint's storage, not the architecture


def add_parser(subparsers: Any) -> None:
    """Add the ``estimate`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "estimate",
        help="parameter counts and FLOPs per token of a Hugging Face config.json (built on meta)",
        description=__doc__,
    )
    parser.add_argument("--config", required=True, type=Path, help="path to a config.json (or its folder)")
    parser.add_argument("--seq-len", required=True, type=int, help="tokens per training sequence")
    parser.add_argument(
        "--no-causal",
        dest="causal",
        action="store_false",
        help="count every key per query in attention layers that do not say whether they are causal",
    )
    parser.add_argument(
        "--convention", default="mfumon", choices=CONVENTIONS, help="FLOP convention (default mfumon)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="experts per token, if the config has none")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the counts and the per-component FLOPs table; 0 on success, 2 on bad input."""
    try:
        model, model_type = build_meta_model(args.config)
        top_k = getattr(args, "top_k", None)
        counts = count_params(model, top_k=top_k)
        breakdown = flop_breakdown(
            model, args.seq_len, causal=args.causal, convention=args.convention, top_k=top_k
        )
    except MfumonError as exc:
        print(f"mfumon estimate: {exc}", file=sys.stderr)
        return 2
    header = f"{model_type} ({type(model).__name__}) from {args.config}, built on the meta device"
    print(header)
    print()
    print(_counts_table(counts))
    print()
    causal = "causal" if args.causal else "bidirectional"
    causal += " attention where the model does not say"
    print(
        f"Training FLOPs per token (forward + backward), {args.convention}, seq_len {args.seq_len}, {causal}"
    )
    print(_flops_table(breakdown))
    return 0


def build_meta_model(config_path: Path | str) -> tuple[nn.Module, str]:
    """The causal LM that `config_path` describes, on the meta device, and its model_type."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise MissingDependencyError(
            "mfumon estimate needs transformers: pip install 'mfumon[transformers]'"
        ) from None
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object, got {type(data).__name__}")
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"--config: {path} names model_type={model_type!r}, which transformers does not know; "
            f"pass a config.json with a model_type such as 'llama', 'mixtral' or 'deepseek_v3'"
        )
    for key in _DROPPED_KEYS:
        data.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"--config: transformers cannot build a causal LM from {path}: {exc}") from None
    return model, model_type


def _human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k" if unit else "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _counts_table(c: ParamCounts) -> str:
    rows = [
        ("total", c.total, "every distinct parameter once"),
        ("active", c.active, "touched by one token"),
        ("embedding", c.embedding, "lookups, 0 FLOPs"),
        ("lm_head", c.lm_head, "output projection"),
        ("matmul_active", c.matmul_active, "multiplied per token (the N of 6N)"),
        ("trainable", c.trainable, "requires grad (frozen weights cost 2 or 4 per token, not 6)"),
    ]
    lines = [f"{'parameters':<15}{'count':>18}{'':>11}  meaning"]
    lines += [f"{name:<15}{n:>18,}{_human(n):>11}  {what}" for name, n, what in rows]
    if c.moe_layers:
        lines.append(f"{'MoE':<15}{c.moe_layers} layers, top-{c.top_k} of {c.num_experts} routed experts")
    return "\n".join(lines)


def _flops_table(b: FlopBreakdown) -> str:
    total = b.total or 1
    lines = [f"{'component':<15}{'FLOPs/token':>18}{'':>14}{'share':>8}"]
    for f in fields(b):
        value = getattr(b, f.name)
        if f.name == "recompute" or (value == 0 and f.name in ("embedding", "softmax")):
            continue
        lines.append(f"{f.name:<15}{value:>18,}{_human(value, 'FLOP'):>14}{value / total:>8.1%}")
    lines.append(f"{'total':<15}{b.total:>18,}{_human(b.total, 'FLOP'):>14}{1:>8.1%}")
    return "\n".join(lines)
