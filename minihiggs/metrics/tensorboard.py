"""A TensorBoard sink that writes event files itself: no tensorboard (or TensorFlow) import needed to *write*.

An event file (`events.out.tfevents.<time>.<host>.<pid>.<n>`) is a TFRecord stream of `Event` protobufs:

    record = uint64 length (LE) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with `masked(c) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32`. The protobuf fields used (tensorflow/core/util/
event.proto, summary.proto):

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
                 SessionLog session_log = 7; }
    Summary    { repeated Value value = 1; }     Value { string tag = 1; float simple_value = 2; }
    SessionLog { SessionStatus status = 1; }     (START = 1)

The first event of a file holds `file_version = "brain.Event:2"`. A resumed run writes a SessionLog START at
the first re-done step, so TensorBoard drops the orphaned points after the checkpoint (its `purge_orphaned_data`).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from itertools import count
from pathlib import Path

from .scalars import scalars

FILE_VERSION = "brain.Event:2"
SESSION_START = 1
_file_counter = count()


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
    """One TFRecord frame around `data`."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---- protobuf wire format (only what Event needs) -------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields: two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def summary_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value)


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 values: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """An `Event` message: a file-version header, a summary of scalar values, or a SessionLog START."""
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, summary_value(t, v)) for t, v in values.items()))
    if session_start:
        out += _bytes_field(7, _key(1, 0) + _varint(SESSION_START))
    return out


# ---- the sink -------------------------------------------------------------------------------------------------

class TensorBoardSink:
    """Scalars of every train/val record (see `scalars`) as one event each; flushed per record so a running job
    can be watched with `tensorboard --logdir OUTPUT_DIR/tensorboard`."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        # A new file per run (resumes too): the pid and a counter keep names unique within one second.
        self.path = self.log_dir / (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}."
                                    f"{next(_file_counter)}")
        self._f = open(self.path, "ab")
        self._write(encode_event(now, file_version=FILE_VERSION))

    def _write(self, event: bytes) -> None:
        self._f.write(tf_record(event))
        self._f.flush()

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self._write(encode_event(record.get("time", time.time()), int(record["step"]), values=values))

    def truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after `step`: TensorBoard discards what an earlier run logged there."""
        self._write(encode_event(time.time(), step + 1, session_start=True))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
