# A C struct (little-endian unless told: jbd2's journal is big-endian) described as an ordered list
# of (field name, struct format) pairs, so that encoders spell the kernel's field names once and
# tests can check offsets against another reader.
# Fields not given to pack() are zero; unknown names are an error (a typo must not pass silently).
from __future__ import annotations

import struct


class CStruct:
    def __init__(
        self, name: str, fields: list[tuple[str, str]], size: int | None = None, endian: str = "<"
    ) -> None:
        self.name = name
        self.fields = fields
        self.names = [f for f, _ in fields]
        fmt = endian + "".join(f for _, f in fields)
        self._struct = struct.Struct(fmt)
        self.size = size if size is not None else self._struct.size
        assert self.size >= self._struct.size, name
        self.offsets: dict[str, int] = {}
        off = 0
        for fname, ffmt in fields:
            self.offsets[fname] = off
            off += struct.calcsize("<" + ffmt)
        self._index = {f: i for i, f in enumerate(self.names)}
        self._zero = [b"" if f.endswith("s") else 0 for _, f in fields]

    def values(self, **kw: int | bytes) -> list[int | bytes]:
        vals = list(self._zero)
        for k, v in kw.items():
            vals[self._index[k]] = v
        return vals

    def pack(self, **kw: int | bytes) -> bytes:
        raw = self._struct.pack(*self.values(**kw))
        return raw + bytes(self.size - len(raw))

    def pack_into(self, buf: bytearray, offset: int, **kw: int | bytes) -> None:
        self._struct.pack_into(buf, offset, *self.values(**kw))

    def unpack(self, buf: bytes, offset: int = 0) -> dict[str, int | bytes]:
        return dict(zip(self.names, self._struct.unpack_from(buf, offset), strict=True))
