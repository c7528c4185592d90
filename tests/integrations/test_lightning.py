"""The Lightning callback in a real `lightning.Trainer` on the CPU, read back from CSVLogger's file."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning
from tests.conftest import TinyLM, mfumon_records
from tests.procs import exit_now, run

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.loggers import Logger as LightningLogger  # noqa: E402

from mfumon.integrations.lightning import MFUCallback  # noqa: E402

SEQ, BATCH, VOCAB = 32, 4, 128


class PaddedTokens(Dataset):
    """Random token rows, each with `pad` padding positions at the end (attention_mask 0)."""

    def __init__(self, n: int, pad: int = 8, vocab: int = VOCAB, seq: int = SEQ) -> None:
        self.n, self.vocab, self.seq, self.pad = n, vocab, seq, pad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(self.seq, dtype=torch.long)
        mask[self.seq - self.pad :] = 0
        return {"input_ids": ids, "attention_mask": mask}


class GPTModule(L.LightningModule):
    """A tiny GPT-2 (random weights, built from a config); validation sleeps `val_sleep_s` per batch."""

    def __init__(self, val_sleep_s: float = 0.0) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64)
        self.model = GPT2LMHeadModel(cfg)
        self.val_sleep_s = val_sleep_s

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch, labels=batch["input_ids"]).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        time.sleep(self.val_sleep_s)  # a slow evaluation: must be in no step's time
        self.log("val_loss", self.model(**batch, labels=batch["input_ids"]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class TinyModule(L.LightningModule):
    """TinyLM trained on (batch, seq) integer tensors or on dicts with input_ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyLM(vocab=32, d=16)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        logits = self.net(ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Regressor(L.LightningModule):
    """No tokens anywhere: float features in, a float out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(16, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepClock(L.Callback):
    """The test's own clock: when each optimizer step ended, and when each validation ran."""

    def __init__(self) -> None:
        self.step_end: dict[int, float] = {}
        self.validations: list[tuple[int, float, float]] = []  # (after step, start, end)
        self._val_start = 0.0

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.step_end.setdefault(trainer.global_step, time.perf_counter())

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.validations.append((trainer.global_step, self._val_start, time.perf_counter()))


def trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> Any:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=CSVLogger(str(tmp_path), name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    options.update(kw)
    return L.Trainer(callbacks=callbacks, **options)


def csv_rows(tmp_path: Path) -> list[dict[str, float]]:
    """Rows of CSVLogger's metrics.csv that hold mfumon keys, as floats."""
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows if r.get(K.MFU)]


def test_fit_with_accumulation_and_validation_logs_to_csv(tmp_path: Path) -> None:
    steps, warmup, accumulate, peak = 20, 2, 2, 0.5
    module = GPTModule(val_sleep_s=0.15)
    clock = StepClock()
    cb = MFUCallback(peak_tflops=peak, warmup=warmup)
    t = trainer(
        tmp_path,
        [cb, clock],
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        val_check_interval=20,  # batches: after optimizer steps 10 and 20
        limit_val_batches=2,
    )
    t.fit(
        module, DataLoader(PaddedTokens(400), batch_size=BATCH), DataLoader(PaddedTokens(8), batch_size=BATCH)
    )
    assert t.global_step == steps

    tokens_per_step = accumulate * BATCH * (SEQ - 8)  # 2 micro-batches x 4 rows x 24 non-padding = 192
    fpt = mfumon.flops_per_token(module, SEQ)
    rows = csv_rows(tmp_path)
    # one row per window of log_every_n_steps=5; Lightning logs step k's metrics at step k - 1
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]
    for r in rows:
        assert r[K.TOKENS_PER_S] * r[K.STEP_TIME_MS] / 1e3 == pytest.approx(tokens_per_step)
        assert r[K.TFLOPS_PER_DEVICE] == pytest.approx(r[K.TOKENS_PER_S] * fpt / 1e12)
        assert r[K.MFU] == pytest.approx(r[K.TFLOPS_PER_DEVICE] / peak)
        assert r[K.PEAK_TFLOPS] == peak
    summary = cb.monitor.summary()
    assert cb.monitor.flops_per_token == fpt
    assert summary["steps"] == steps - warmup
    assert summary["tokens"] == (steps - warmup) * tokens_per_step
    assert rows[-1][K.MFU_AVG] == pytest.approx(summary[K.MFU_AVG])

    # The test's clock over steps 3..20, less the validation after step 10 (0.3 s of sleep):
    # the monitor's timed seconds must match it, so validation is in no step.
    (after, v0, v1), _ = clock.validations
    assert after == 10 and v1 - v0 >= 2 * 0.15
    train_only_s = clock.step_end[steps] - clock.step_end[warmup] - (v1 - v0)
    assert summary["seconds"] == pytest.approx(train_only_s, rel=0.3)  # with it: about +80%

    # The time ledger: that validation is paused time in the window of steps 11..15 (logged at 14).
    span = clock.step_end[15] - clock.step_end[10]
    by_step = {int(r["step"]): r for r in rows}
    assert by_step[14][K.GOODPUT] == pytest.approx((span - (v1 - v0)) / span, abs=0.05)
    assert all(by_step[14][K.GOODPUT] < by_step[s][K.GOODPUT] for s in by_step if s != 14)
    assert all(by_step[s][K.GOODPUT] > 0.85 for s in (4, 9, 19))
    assert by_step[14][K.MFU_WALL] == pytest.approx(by_step[14][K.MFU] * by_step[14][K.GOODPUT])
    assert summary["paused_s"] == pytest.approx(v1 - v0, abs=0.1)  # the one after step 20 ends the run
    assert all(0.0 <= r[K.INPUT_WAIT_FRAC] < 1.0 for r in rows)  # the first forward was seen


class BrokenLightningLogger(LightningLogger):
    """A Lightning logger whose storage fails for mfumon's keys (Lightning's own keys are fine)."""

    name, version = "broken", 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith("mfumon/") for k in metrics):
            raise OSError("disk full")


class BrokenLogger(mfumon.Logger):
    def log(self, metrics: Any, step: int) -> None:
        raise RuntimeError("backend down")


def test_raising_loggers_never_stop_fit(tmp_path: Path, mfumon_log) -> None:
    cb = MFUCallback(peak_tflops=1.0, warmup=0, loggers=(BrokenLogger(),))
    loggers = [BrokenLightningLogger(), CSVLogger(str(tmp_path), name="csv", version=0)]
    t = trainer(tmp_path, [cb], max_steps=10, logger=loggers)
    t.fit(TinyModule(), DataLoader(torch.randint(0, 32, (64, 8)), batch_size=BATCH))
    assert t.global_step == 10
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [4, 9]  # the CSV logger got every window
    messages = sorted(r.getMessage() for r in mfumon_records(mfumon_log))
    assert len(messages) == 2  # one record per broken logger, once
    assert "BrokenLightningLogger" in messages[0] and "BrokenLogger" in messages[1]
    assert cb.monitor.summary()["tokens"] == 10 * BATCH * 8  # a (batch, seq) integer tensor: 4 x 8


def test_no_tokens_in_batch_warns_once_and_fit_goes_on(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64))
    cb = MFUCallback(peak_tflops=1.0)
    t = trainer(tmp_path, [cb], max_steps=6)
    with pytest.warns(MfumonWarning, match=r"tokens_per_batch=.*tokens_fn=") as caught:
        t.fit(Regressor(), DataLoader(data, batch_size=BATCH))
    assert len([w for w in caught if issubclass(w.category, MfumonWarning)]) == 1
    assert t.global_step == 6 and cb.monitor is None


def test_tokens_per_batch_for_a_batch_without_tokens(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64))
    steps, warmup = 6, 1
    cb = MFUCallback(tokens_per_batch=64, seq_len=16, peak_tflops=1.0, warmup=warmup, log_every=3)
    t = trainer(tmp_path, [cb], max_steps=steps, accumulate_grad_batches=2)
    t.fit(Regressor(), DataLoader(data, batch_size=BATCH))
    assert cb.monitor.summary()["tokens"] == (steps - warmup) * 2 * 64  # 2 micro-batches of 64 per step
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [2, 5]


def test_internal_fault_is_reported_once_and_fit_goes_on(tmp_path: Path, mfumon_log) -> None:
    calls = []

    def tokens_fn(batch: torch.Tensor) -> int:
        calls.append(1)
        if len(calls) >= 3:
            raise ValueError("unexpected batch layout")
        return batch.numel()

    cb = MFUCallback(tokens_fn=tokens_fn, peak_tflops=1.0, warmup=0, log_every=2)
    t = trainer(tmp_path, [cb], max_steps=8)
    t.fit(TinyModule(), DataLoader(torch.randint(0, 32, (64, 8)), batch_size=BATCH))
    assert t.global_step == 8
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "on_train_batch_start" in records[0].getMessage()
    assert "ValueError" in records[0].getMessage()
    assert len(calls) == 3  # batches 1-3; switched off at 3: never called again
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [1]  # the window of steps 1-2; then off


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(log_every=0), ConfigError, "log_every"),
        (dict(seq_len=-1), ConfigError, "seq_len"),
        (dict(tokens_per_batch=8, tokens_fn=len), ConfigError, "not both"),
        (dict(tokens_fn=3), ConfigTypeError, "tokens_fn"),
        (dict(loggers=("nope",)), ConfigError, "unknown logger"),
        (dict(dtype="fp99"), ConfigError, "dtype"),
        (dict(peak_tflops=-1.0), ConfigError, "peak_tflops"),
        (dict(convention="7N"), ConfigError, "convention"),
        (dict(recompute=1.5), ConfigError, "recompute"),
        (dict(recompute="sometimes"), ConfigError, "auto"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MFUCallback(**kwargs)


def test_precision_gives_the_peak_dtype(tmp_path: Path) -> None:
    cb = MFUCallback(peak_tflops=1.0, log_every=2)
    t = trainer(tmp_path, [cb], max_steps=4, precision="bf16-mixed")
    t.fit(TinyModule(), DataLoader(torch.randint(0, 32, (64, 8)), batch_size=BATCH))
    assert cb.monitor.peak.dtype == "bf16"
    assert cb.monitor.run_info()["peak_dtype"] == "bf16"


def test_missing_lightning_names_the_extra() -> None:
    code = (
        "import sys\n"
        "for name in ('lightning', 'lightning.pytorch', 'lightning.pytorch.callbacks'):\n"
        "    sys.modules[name] = None\n"
        "from mfumon.integrations.lightning import MFUCallback\n"
        "try:\n"
        "    MFUCallback()\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = run([sys.executable, "-c", code], check=True).stdout
    assert out.strip() == (
        "MissingDependencyError MFUCallback for Lightning needs lightning: pip install 'mfumon[lightning]'"
    )


# -- two processes -------------------------------------------------------------------------------
PAD_BY_RANK = {0: 8, 1: 12}  # padding positions per row on each rank


def collate_by_rank(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows; each rank pads its rows differently, so the ranks feed different token counts."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["attention_mask"][:, -PAD_BY_RANK[torch.distributed.get_rank()] :] = 0
    return batch


def tokens_on_rank_0_only(batch: torch.Tensor) -> int | None:
    """A tokens_fn that finds nothing on rank 1: that rank cannot set up its monitor."""
    return batch.numel() if torch.distributed.get_rank() == 0 else None


def ddp_main(scenario: str, out_dir: str) -> None:
    """One rank of a two-rank Lightning DDP fit, launched by torchrun (see `torchrun_fit`)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    tmp_path = Path(out_dir)
    if scenario == "global":
        cb = MFUCallback(peak_tflops=1.0, warmup=1, loggers=("stdout",))
        t = trainer(tmp_path, [cb], max_steps=10, devices=2, strategy="ddp", accumulate_grad_batches=2)
        data = PaddedTokens(256, pad=0, vocab=32, seq=16)
        t.fit(TinyModule(), DataLoader(data, batch_size=BATCH, collate_fn=collate_by_rank))
    else:  # "setup problem": rank 1 finds no tokens
        cb = MFUCallback(tokens_fn=tokens_on_rank_0_only, peak_tflops=1.0, warmup=0, loggers=("stdout",))
        # a rank left waiting in a collective would fail after 60 s instead of hanging
        strategy = DDPStrategy(timeout=timedelta(seconds=60))
        t = trainer(tmp_path, [cb], max_steps=6, devices=2, strategy=strategy, log_every_n_steps=2)
        t.fit(TinyModule(), DataLoader(torch.randint(0, 32, (64, 8)), batch_size=BATCH))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    exit_now()  # gloo's teardown at interpreter exit can abort after the work is done (tests/procs.py)


def torchrun_fit(scenario: str, tmp_path: Path) -> Any:
    """Two ranks under torchrun (Lightning detects it and launches nothing itself); their output."""
    script = tmp_path / "rank.py"
    root = Path(__file__).resolve().parents[2]
    script.write_text(
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "from tests.integrations.test_lightning import ddp_main\n"
        "ddp_main(sys.argv[1], sys.argv[2])\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return run([*torchrun, str(script), scenario, str(tmp_path)], check=True)


def test_ddp_two_processes_log_once_with_global_figures(tmp_path: Path) -> None:
    out = torchrun_fit("global", tmp_path).stdout
    assert out.count("[mfumon] step 5 |") == 1 and out.count("[mfumon] step 10 |") == 1  # rank 0 only
    assert "x2, peak 1 TFLOP/s" in out  # the run facts name both devices
    rows = csv_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [4, 9]
    # per optimizer step: 2 micro-batches x 4 rows x (16-8 on rank 0 + 16-12 on rank 1) non-padding tokens
    global_tokens = 2 * BATCH * ((16 - 8) + (16 - 12))
    for r in rows:
        assert r[K.TOKENS_PER_S] * r[K.STEP_TIME_MS] / 1e3 == pytest.approx(global_tokens)
        assert r[K.TOKENS_PER_S_PER_DEVICE] == pytest.approx(r[K.TOKENS_PER_S] / 2)


def test_ddp_setup_problem_on_one_rank_switches_every_rank_off(tmp_path: Path) -> None:
    captured = torchrun_fit("setup problem", tmp_path)
    assert captured.stderr.count("tokens_per_batch=") == 1  # rank 1's message, once
    assert "[mfumon]" not in captured.stdout  # rank 0 switched off too: no line, no window
    assert not (tmp_path / "csv" / "version_0" / "metrics.csv").exists() or not csv_rows(tmp_path)


def test_a_run_resumed_from_its_checkpoint_continues_at_the_right_step(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = DataLoader(PaddedTokens(400, pad=0, vocab=32, seq=16), batch_size=BATCH)

    def fit(max_steps: int, ckpt_path: str | None) -> MFUCallback:
        cb = MFUCallback(peak_tflops=1.0, warmup=1, loggers=("jsonl",), run_name="r", log_dir=tmp_path)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5)
        t = trainer(tmp_path, [cb, saver], max_steps=max_steps, enable_checkpointing=True)
        t.fit(TinyModule(), data, ckpt_path=ckpt_path)
        assert t.global_step == max_steps
        return cb

    fit(10, None)
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [4, 9]  # Lightning logs step k at k - 1
    resumed = fit(20, str(tmp_path / "ckpt" / "last.ckpt"))
    # the resumed run's CSV (a new file for the same version) continues the axis: 14, 19, not 4, 9
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == [14, 19]
    # mfumon's own JSONL: windows of both runs, steps 5, 10 then 15, 20 (not 5, 10 again)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert resumed.monitor.summary()["last_step"] == 20


def test_profile_every_reaches_the_users_loggers(tmp_path: Path) -> None:
    profiles: dict[int, Any] = {}

    class Keep(mfumon.Logger):
        def log_profile(self, profile: Any, step: int) -> None:
            profiles[step] = profile

    cb = MFUCallback(peak_tflops=1.0, warmup=0, profile_every=4, loggers=(Keep(),))
    t = trainer(tmp_path, [cb], max_steps=10)
    t.fit(TinyModule(), DataLoader(torch.randint(0, 32, (64, 8)), batch_size=BATCH))
    assert sorted(profiles) == [4, 8]  # through the callback's gate, once per profiled optimizer step
    profile = profiles[8]
    assert sum(r.seconds for r in profile.rows) == pytest.approx(profile.seconds)
    assert profile.row("optimizer") is not None and profile.row("optimizer").seconds > 0
    assert cb.monitor.summary()["steps"] == 10 - 2  # the profiled steps are out of the windows
