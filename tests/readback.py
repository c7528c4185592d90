"""Read back what a logger wrote, with each backend's own reader: TensorBoard event files, W&B runs.

tensorboard and wandb are imported inside the functions, so a test module can import these
helpers without them and skip only the tests that need one.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

# The .wandb file is a LevelDB log (wandb core/pkg/leveldb/record.go): a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header:
# crc32 of type+payload (4), payload length (2), type (1). A record longer than what is left of
# a block goes out as FIRST, MIDDLE..., LAST chunks; a block tail too short for a chunk header is
# zero-filled. The writer keeps the current block in memory and writes it only when the block
# fills or when the run's stream closes in the wandb service.
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def tb_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under `path` as (step, value) pairs, read by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_texts(path: Path) -> dict[str, Any]:
    """Text summaries under `path` (TensorBoard stores them as string tensors)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag.removesuffix("/text_summary"): acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in acc.Tags()["tensors"]
    }


def wandb_records(path: Path) -> list[Any]:
    """Every record of a complete .wandb file, as `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:HEADER] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), "not a .wandb file"
    pos, pieces, out = HEADER, None, []
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # zero-filled block tail
            assert not any(data[pos : pos + left]), f"non-zero block tail at {pos}"
            pos += left
            continue
        at = pos
        crc, length, kind = struct.unpack_from("<IHB", data, at)
        payload = data[at + HEADER : at + HEADER + length]
        assert HEADER + length <= left and len(payload) == length, f"chunk at {at} overruns"
        assert crc == zlib.crc32(payload, zlib.crc32(bytes([kind]))), f"bad checksum at {at}"
        pos += HEADER + length
        if kind in (FULL, FIRST):
            assert pieces is None, f"record at {at} starts inside another"
            pieces = []
        else:
            assert kind in (MIDDLE, LAST) and pieces is not None, f"stray chunk type {kind} at {at}"
        pieces.append(payload)
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(b"".join(pieces)))
            pieces = None
    assert pieces is None, "the file ends inside a record"
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(root: Path) -> dict[str, Any]:
    """History rows, final config and final summary of the one finished offline run under `root`.

    Tears wandb down first: `run.finish()` only asks the service to close the run's stream (which
    writes the file's last block) and returns; teardown waits for the service to exit, and the
    service handles that request before the teardown.
    """
    import wandb

    wandb.teardown()
    files = sorted(root.rglob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = wandb_records(files[0])
    assert "exit" in [r.WhichOneof("record_type") for r in records], "the run was not finished"
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
    return {"history": history, "config": config, "summary": summary, "dir": files[0].parent}
