"""The decode stage: the Beam adapter over `stages/core/decode.py` (which says
what is kept, dropped and normalised). It also records the SHA-256 of the
downloaded bytes and the pHash of the picture while they are in memory.
"""

from __future__ import annotations

import collections
import hashlib
import time

from apache_beam.metrics import Metrics

from schemas import DecodeConfig, Stage
from stages.base import Drop, FilterDoFn, WithImage
from stages.core.decode import Resizer, decode_image


class DecodeDoFn(FilterDoFn):
    """WithImage(downloaded bytes) -> WithImage(bytes to store), with sizes,
    format, SHA-256 and pHash on the record.

    Metrics (namespace `decode`): `kept`, `dropped_<reason>`, and the
    distribution `decode_ms` (time per row: decode, checks, pHash, resize,
    encode and SHA-256; the benchmarks' per-stage breakdown reads it).
    """

    stage = Stage.DECODE

    def __init__(self, config: DecodeConfig):
        super().__init__()
        self.config = config
        self._resizer = None
        self._decode_ms = None

    def setup(self):
        if self.config.resize_mode != "no":
            self._resizer = Resizer(self.config)
        self._decode_ms = Metrics.distribution(Stage.DECODE.value, "decode_ms")
        self._timings_ms: collections.deque[int] = collections.deque()  # appended from any thread

    def apply(self, element: WithImage):
        started = time.perf_counter()
        try:
            return self._decode(element)
        finally:
            # Kept for `settle`: `apply` may run on a thread of the crawl's
            # (`AfterFetch`), where Beam records no metrics.
            self._timings_ms.append(int((time.perf_counter() - started) * 1000))

    def settle(self, element, result):
        while self._timings_ms:
            self._decode_ms.update(self._timings_ms.popleft())
        yield from super().settle(element, result)

    def _decode(self, element: WithImage):
        decoded = decode_image(element.data, self.config, self._resizer)
        if isinstance(decoded, Drop):
            return decoded
        record = element.record.model_copy(
            update={
                "original_width": decoded.original_width,
                "original_height": decoded.original_height,
                "width": decoded.width,
                "height": decoded.height,
                "image_format": decoded.fmt,
                "image_bytes": len(decoded.data),
                "image_sha256": hashlib.sha256(element.data).hexdigest(),
                "phash": decoded.phash,
            }
        )
        return WithImage(record, decoded.data)
