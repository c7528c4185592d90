"""The HF Trainer callback in a real `transformers.Trainer` on the CPU, read back from what it wrote."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, MfumonWarning
from tests.conftest import mfumon_records
from tests.procs import run
from tests.readback import tb_scalars, wandb_run

pytestmark = pytest.mark.transformers  # scripts/tf4/run.sh runs them on transformers 4.57 too

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from mfumon.integrations.transformers import MFUCallback  # noqa: E402

SEQ, PAD, BATCH, VOCAB = 32, 8, 4, 128


class PaddedTokens(Dataset):
    """Random token rows with `pad` padding positions at the end (attention_mask 0)."""

    def __init__(self, n: int, pad: int = PAD) -> None:
        self.n, self.pad = n, pad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - self.pad :] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def tiny_gpt2() -> torch.nn.Module:
    """GPT-2 with two layers and random weights, from a config (no download)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


class TokensModel(torch.nn.Module):
    """A tiny LM whose input is called `tokens`, so the batch shows no input_ids to the callback."""

    main_input_name = "tokens"  # the Trainer counts num_input_tokens_seen from this input

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(tokens))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}


class TokensRows(Dataset):
    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(i))
        return {"tokens": row, "labels": row}


class Clock(TrainerCallback):
    """The test's own clock: when each optimizer step ended and when each evaluation ended.

    Evaluation sleeps `eval_sleep_s` per batch: slow evaluation must be in no step's time.
    """

    def __init__(self, eval_sleep_s: float = 0.0) -> None:
        self.eval_sleep_s = eval_sleep_s
        self.step_end: dict[int, float] = {}
        self.eval_end: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step_end[state.global_step] = time.perf_counter()

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        time.sleep(self.eval_sleep_s)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.eval_end[state.global_step] = time.perf_counter()


def args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    options.update(kw)
    return TrainingArguments(**options)


def mfumon_logs(trainer: Any) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if K.MFU in e]


def test_train_with_accumulation_and_evaluation(tmp_path: Path) -> None:
    steps, warmup, accumulate, peak = 20, 2, 2, 0.5
    clock = Clock(eval_sleep_s=0.15)
    cb = MFUCallback(peak_tflops=peak, warmup=warmup)
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=steps,
            gradient_accumulation_steps=accumulate,
            eval_strategy="steps",
            eval_steps=10,
        ),
        train_dataset=PaddedTokens(400),
        eval_dataset=PaddedTokens(2 * BATCH),  # two evaluation batches: 0.3 s of sleep
        callbacks=[cb, clock],
    )
    trainer.train()
    assert trainer.state.global_step == steps

    tokens_per_step = accumulate * BATCH * (SEQ - PAD)  # 2 micro-batches x 4 rows x 24 non-padding = 192
    fpt = mfumon.flops_per_token(model, SEQ)
    logs = mfumon_logs(trainer)
    assert [e["step"] for e in logs] == [5, 10, 15, 20]  # each window joins the Trainer's loss log
    assert all("loss" in e for e in logs)
    for e in logs:
        assert e[K.TOKENS_PER_S] * e[K.STEP_TIME_MS] / 1e3 == pytest.approx(tokens_per_step)
        assert e[K.TFLOPS_PER_DEVICE] == pytest.approx(e[K.TOKENS_PER_S] * fpt / 1e12)
        assert e[K.MFU] == pytest.approx(e[K.TFLOPS_PER_DEVICE] / peak)
    summary = cb.monitor.summary()
    assert summary["steps"] == steps - warmup
    assert summary["tokens"] == (steps - warmup) * tokens_per_step
    assert logs[-1][K.MFU_AVG] == pytest.approx(summary[K.MFU_AVG])

    # The test's clock over steps 3..20, less the evaluation after step 10 (0.3 s of sleep).
    eval_s = clock.eval_end[10] - clock.step_end[10]
    assert eval_s >= 2 * 0.15
    train_only_s = clock.step_end[steps] - clock.step_end[warmup] - eval_s
    assert summary["seconds"] == pytest.approx(train_only_s, rel=0.3)  # with it: about +80%

    # The time ledger: that evaluation is paused time in the window of steps 11..15.
    span = clock.step_end[15] - clock.step_end[10]
    by_step = {e["step"]: e for e in logs}
    assert by_step[15][K.GOODPUT] == pytest.approx((span - eval_s) / span, abs=0.05)
    assert all(by_step[15][K.GOODPUT] < by_step[s][K.GOODPUT] for s in by_step if s != 15)
    assert all(by_step[s][K.GOODPUT] > 0.85 for s in (5, 10, 20))
    assert by_step[15][K.MFU_WALL] == pytest.approx(by_step[15][K.MFU] * by_step[15][K.GOODPUT])
    assert summary["paused_s"] == pytest.approx(eval_s, abs=0.1)
    assert all(0.0 <= e[K.INPUT_WAIT_FRAC] < 1.0 for e in logs)  # the first forward was seen


def train_reporting_to(tmp_path: Path, integration: str) -> list[dict[str, Any]]:
    """Ten steps with MFUCallback and the Trainer's `integration` (report_to); the mfumon log entries."""
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args(tmp_path, max_steps=10, report_to=[integration]),
        train_dataset=PaddedTokens(64),
        callbacks=[MFUCallback(peak_tflops=0.5, warmup=1)],
    )
    trainer.train()
    logs = mfumon_logs(trainer)
    assert [e["step"] for e in logs] == [5, 10]
    return logs


# The report_to integrations run after MFUCallback's on_log, so they get its keys (prefixed "train/").
def test_report_to_tensorboard_gets_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5; 4.x: logging_dir
    logs = train_reporting_to(tmp_path, "tensorboard")
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    scalars = tb_scalars(events[0].parent)
    assert [s for s, _ in scalars["train/mfumon/mfu"]] == [5, 10]
    assert [v for _, v in scalars["train/mfumon/mfu"]] == pytest.approx([e[K.MFU] for e in logs], rel=1e-6)


def test_report_to_wandb_gets_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        logs = train_reporting_to(tmp_path, "wandb")
        wandb.finish()  # the Trainer leaves its W&B run open
        history = [r for r in wandb_run(tmp_path)["history"] if "train/mfumon/mfu" in r]
    finally:
        wandb.teardown()  # wandb reads its settings from the environment once per process
    assert [r["train/global_step"] for r in history] == [5, 10]
    assert [r["train/mfumon/tokens_per_s"] for r in history] == pytest.approx(
        [e[K.TOKENS_PER_S] for e in logs]
    )


def test_tokens_from_num_input_tokens_seen(tmp_path: Path) -> None:
    steps, warmup = 8, 1
    cb = MFUCallback(seq_len=16, peak_tflops=1.0, warmup=warmup, log_every=4)
    trainer = Trainer(
        model=TokensModel(),
        args=args(
            tmp_path, max_steps=steps, gradient_accumulation_steps=2, include_num_input_tokens_seen=True
        ),
        train_dataset=TokensRows(),
        callbacks=[cb],
    )
    trainer.train()
    tokens_per_step = 2 * BATCH * 16  # 2 micro-batches x 4 rows x 16 tokens, as the Trainer counted them
    assert trainer.state.num_input_tokens_seen == steps * tokens_per_step
    assert cb.monitor.summary()["tokens"] == (steps - warmup) * tokens_per_step
    assert [e["step"] for e in mfumon_logs(trainer)] == [4, 8]


def test_no_tokens_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    cb = MFUCallback(seq_len=16, peak_tflops=1.0)
    trainer = Trainer(
        model=TokensModel(), args=args(tmp_path, max_steps=4), train_dataset=TokensRows(), callbacks=[cb]
    )
    with pytest.warns(MfumonWarning, match=r"tokens_per_batch=.*tokens_fn=") as caught:
        trainer.train()
    assert len([w for w in caught if issubclass(w.category, MfumonWarning)]) == 1
    assert trainer.state.global_step == 4 and cb.monitor is None and not mfumon_logs(trainer)


def test_tokens_fn_reads_the_model_inputs(tmp_path: Path) -> None:
    cb = MFUCallback(tokens_fn=lambda inputs: inputs["tokens"].numel(), seq_len=16, peak_tflops=1.0, warmup=0)
    trainer = Trainer(
        model=TokensModel(), args=args(tmp_path, max_steps=5), train_dataset=TokensRows(), callbacks=[cb]
    )
    trainer.train()
    assert cb.monitor.summary()["tokens"] == 5 * BATCH * 16
    assert [e["step"] for e in mfumon_logs(trainer)] == [5]


class BrokenLogger(mfumon.Logger):
    def log(self, metrics: Any, step: int) -> None:
        raise RuntimeError("backend down")


def test_raising_logger_never_stops_training(tmp_path: Path, mfumon_log) -> None:
    cb = MFUCallback(peak_tflops=1.0, warmup=0, loggers=(BrokenLogger(),))
    trainer = Trainer(
        model=tiny_gpt2(), args=args(tmp_path, max_steps=10), train_dataset=PaddedTokens(64), callbacks=[cb]
    )
    trainer.train()
    assert [e["step"] for e in mfumon_logs(trainer)] == [5, 10]  # the Trainer's logs still get them
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "BrokenLogger" in records[0].getMessage()


def test_internal_fault_is_reported_once_and_training_goes_on(tmp_path: Path, mfumon_log) -> None:
    calls = []

    def tokens_fn(inputs: dict[str, torch.Tensor]) -> int:
        calls.append(1)
        if len(calls) >= 3:
            raise ValueError("unexpected inputs")
        return inputs["tokens"].numel()

    cb = MFUCallback(tokens_fn=tokens_fn, seq_len=16, peak_tflops=1.0, warmup=0, log_every=2)
    trainer = Trainer(
        model=TokensModel(), args=args(tmp_path, max_steps=8), train_dataset=TokensRows(), callbacks=[cb]
    )
    trainer.train()
    assert trainer.state.global_step == 8
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "forward pre-hook" in records[0].getMessage()
    assert len(calls) == 3  # micro-batches 1-3; switched off at 3: never called again
    assert [e["step"] for e in mfumon_logs(trainer)] == [2]


def test_bf16_argument_gives_the_peak_dtype(tmp_path: Path) -> None:
    cb = MFUCallback(peak_tflops=1.0, log_every=2)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args(tmp_path, max_steps=2, bf16=True),
        train_dataset=PaddedTokens(16),
        callbacks=[cb],
    )
    trainer.train()
    assert cb.monitor.peak.dtype == "bf16"


def test_bad_arguments_raise_at_construction() -> None:
    with pytest.raises(ConfigError, match="log_every"):
        MFUCallback(log_every=0)
    with pytest.raises(ConfigError, match="tokens_per_batch"):
        MFUCallback(tokens_per_batch=0)
    with pytest.raises(ConfigError, match="recompute"):
        MFUCallback(recompute=-0.5)


def test_missing_transformers_names_the_extra() -> None:
    code = (
        "import sys\n"
        "for name in ('transformers', 'transformers.trainer_callback'):\n"
        "    sys.modules[name] = None\n"
        "from mfumon.integrations.transformers import MFUCallback\n"
        "try:\n"
        "    MFUCallback()\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = run([sys.executable, "-c", code], check=True).stdout
    assert out.strip() == (
        "MissingDependencyError MFUCallback for the HF Trainer needs transformers: "
        "pip install 'mfumon[transformers]'"
    )


# -- two processes (torchrun) ----------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments
    from mfumon.integrations.transformers import MFUCallback

    PAD_BY_RANK = {0: 8, 1: 12}  # each rank pads its rows differently: different token counts

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 256
        def __getitem__(self, i):
            ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        mask = torch.ones_like(ids)
        mask[:, -PAD_BY_RANK[int(os.environ["RANK"])]:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
    args = TrainingArguments(
        output_dir=sys.argv[1], max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
    )
    trainer = Trainer(
        model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=Rows(), data_collator=collate,
        callbacks=[MFUCallback(peak_tflops=1.0, warmup=1, loggers=("stdout",))],
    )
    trainer.train()
    out = os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json")
    with open(out, "w") as f:
        json.dump({"log_history": trainer.state.log_history, "world": torch.distributed.get_world_size()}, f)
    # Gloo's worker threads must stop before the interpreter does, or the exit can abort (SIGABRT);
    # even then teardown sometimes does (tests/procs.py, exit_now): end without it.
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def test_torchrun_two_processes_log_once_with_global_figures(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = run([*torchrun, str(script), str(tmp_path)], check=True).stdout
    assert out.count("[mfumon] step 5 |") == 1 and out.count("[mfumon] step 10 |") == 1
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    logs = [e for e in ranks[0]["log_history"] if K.MFU in e]
    assert [e["step"] for e in logs] == [5, 10]
    assert not [e for e in ranks[1]["log_history"] if K.MFU in e]  # rank 0 logs, once
    # per optimizer step: 2 micro-batches x 4 rows x (16-8 on rank 0 + 16-12 on rank 1) non-padding tokens
    global_tokens = 2 * 4 * ((16 - 8) + (16 - 12))
    for e in logs:
        assert e[K.TOKENS_PER_S] * e[K.STEP_TIME_MS] / 1e3 == pytest.approx(global_tokens)
        assert e[K.TOKENS_PER_S_PER_DEVICE] == pytest.approx(e[K.TOKENS_PER_S] / 2)


def test_a_run_resumed_from_its_checkpoint_continues_at_the_right_step(tmp_path: Path) -> None:
    def train(max_steps: int, resume: bool) -> Any:
        cb = MFUCallback(peak_tflops=1.0, warmup=1, loggers=("jsonl",), run_name="r", log_dir=tmp_path)
        trainer = Trainer(
            model=tiny_gpt2(),
            args=args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=10),
            train_dataset=PaddedTokens(400),
            callbacks=[cb],
        )
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == max_steps
        return trainer, cb

    train(10, resume=False)
    resumed, cb = train(20, resume=True)
    # the Trainer's log history, carried over from the checkpoint, then this run's windows
    assert [e["step"] for e in mfumon_logs(resumed)] == [5, 10, 15, 20]
    # mfumon's own JSONL: windows of both runs on one axis, 5, 10 then 15, 20 (not 5, 10 again)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert cb.monitor.summary()["last_step"] == 20
