"""TensorBoard event files without TensorFlow: scalars and images.

An event file is a TFRecord stream of `tensorflow.Event` protocol buffers. The few messages
needed are encoded by hand here (field numbers from tensorboard's event.proto and
summary.proto), with the record framing's masked CRC-32C, rather than adding TensorFlow
(~1.3 GB) or a dependency for a few dozen lines.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import time

import numpy as np

# ---------------------------------------------------------------- CRC-32C (Castagnoli), as TFRecord frames use

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """uint64 length, masked crc of the length, payload, masked crc of the payload."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc(header)) + payload + struct.pack("<I", masked_crc(payload))


# ---------------------------------------------------------------- protobuf wire format

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, **fields: bytes) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5}."""
    out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
    if "file_version" in fields:
        out += _bytes(3, fields["file_version"])
    if "summary" in fields:
        out += _bytes(5, fields["summary"])
    return out


def scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value{tag=1, simple_value=2 (float)}."""
    return _bytes(1, _bytes(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))


def image_value(tag: str, image: np.ndarray) -> bytes:
    """Summary.Value{tag=1, image=4: Image{height=1, width=2, colorspace=3, encoded_image_string=4 (PNG)}}."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    h, w, c = image.shape
    img = (_field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(c))
           + _bytes(4, buf.getvalue()))
    return _bytes(1, _bytes(1, tag.encode()) + _bytes(4, img))


class EventWriter:
    """Appends events to `<logdir>/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(_event(0, file_version=b"brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(scalar_value(k, float(v)) for k, v in values.items())
        self._file.write(tfrecord(_event(step, summary=summary)))
        self._file.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8."""
        self._file.write(tfrecord(_event(step, summary=image_value(tag, image))))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
