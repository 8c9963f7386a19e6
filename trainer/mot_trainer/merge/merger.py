"""The threaded merger: the merged bytes of each output tensor, slice by slice, for the writer.

Tensors are read by header offset and merged in fp32 in slices of at most SLICE_ELEMENTS elements
(whole tensors for methods that need per-tensor statistics), so peak memory stays near a few slices
whatever the model size and the number of inputs. With threads > 1 the slices of an elementwise method
are merged on a pool of threads (see merge.cpus for the default count).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from mot_trainer.merge.reader import SAFETENSORS_DTYPES, ReadBuffer
from mot_trainer.merge.workspace import Workspace

log = logging.getLogger(__name__)

SLICE_ELEMENTS = 1 << 18  # 1 MiB of fp32: slices stay in a core's L2 (measured fastest of 64Ki-1Mi; 8M: 2x CPU)
# With several merging threads: bigger slices, fewer hand-offs (16-core bench: 1.68-1.84 s with 1 Mi
# for 3-8 threads, 2.13-2.37 s with 256 Ki); past ~4 threads the writer's sha256 of the output bounds it.
PARALLEL_SLICE_ELEMENTS = 1 << 20


class TensorMerger:
    """Yields the merged bytes of one output tensor at a time, in slices where the method allows.

    With threads > 1, the slices of an elementwise method are merged on a pool of threads (torch ops
    and preadv release the GIL), each with its own read buffers and scratch, and handed to the writer
    in order; every slice is computed exactly as on one thread, so the output bits do not change."""

    def __init__(self, method, checkpoints, base, weights, args, pending: list[Future], threads: int = 1):
        self.method, self.checkpoints, self.base, self.weights = method, checkpoints, base, weights
        self.params = {"scale": args.scale, "density": args.density, "seed": args.seed}
        self.pending = pending
        self.parallel = threads > 1 and method.ELEMENTWISE
        self.in_flight = threads if self.parallel else 1  # writer buffers held by merging slices
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="merge") if self.parallel else None
        self._local = threading.local()
        self.done_bytes = 0
        self.last_log = time.monotonic()

    def __enter__(self) -> TensorMerger:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def chunks_for(self, spec, take):
        """Fill writer buffers from `take()` with the merged bytes of one output tensor, slice by slice."""
        self._fail_fast()
        first = self.checkpoints[0]
        if not spec.is_float:  # integer buffers (e.g. position ids) are not averaged: first input's
            for start, count in _slices(spec.numel, SLICE_ELEMENTS):
                buffer = take()
                first.read_into(first.tensors[spec.name], buffer, start, count)
                yield buffer
            return
        out_dtype = _torch_dtype(spec.dtype)
        if self.parallel:
            yield from self._parallel_slices(spec, take, out_dtype)
        else:
            step = SLICE_ELEMENTS if self.method.ELEMENTWISE else max(spec.numel, 1)
            for start, count in _slices(spec.numel, step):
                merged = self._merge(spec, start, count)
                # Whole-tensor results too are handed to the writer in slices: its buffers stay small.
                for offset, n in _slices(count, SLICE_ELEMENTS):
                    buffer = take()
                    buffer.tensor(n, out_dtype).copy_(merged[offset:offset + n])
                    yield buffer
        self._progress(spec.nbytes)

    def merged_slices(self, spec):
        """(start, merged elements) of one float tensor, flat fp32 slices of at most SLICE_ELEMENTS in
        order, merged on the calling thread (the outer step's passes). A slice is the caller's to
        modify, and valid only until the next one is asked for."""
        self._fail_fast()
        step = SLICE_ELEMENTS if self.method.ELEMENTWISE else max(spec.numel, 1)
        for start, count in _slices(spec.numel, step):
            merged = self._merge(spec, start, count)
            for offset, n in _slices(count, SLICE_ELEMENTS):
                yield start + offset, merged[offset:offset + n]
        self._progress(spec.nbytes)

    def _parallel_slices(self, spec, take, out_dtype):
        """At most `in_flight` slices merging at once; yielded in order as each finishes."""
        running: deque[Future] = deque()
        for start, count in _slices(spec.numel, PARALLEL_SLICE_ELEMENTS):
            if len(running) == self.in_flight:
                yield running.popleft().result()
            running.append(self.pool.submit(self._merge_into, take(), spec, start, count, out_dtype))
        while running:
            yield running.popleft().result()

    def _merge_into(self, buffer: ReadBuffer, spec, start: int, count: int, out_dtype) -> ReadBuffer:
        buffer.tensor(count, out_dtype).copy_(self._merge(spec, start, count))
        return buffer

    def _merge(self, spec, start: int, count: int):
        """Elements [start, start+count) of the merged tensor, flat (valid until this thread's next call)."""
        state = self._thread_state()
        tensors = (
            ckpt.read_into(ckpt.tensors[spec.name], buf, start, count)
            for ckpt, buf in zip(self.checkpoints, state.buffers, strict=True)
        )
        base = None
        if self.base is not None:
            base = self.base.read_into(self.base.tensors[spec.name], state.base_buffer, start, count)
        return self.method.merge(tensors, self.weights, base=base, name=spec.name,
                                 workspace=state.workspace, **self.params).reshape(-1)

    def _thread_state(self):
        """Read buffers and scratch of the calling thread, reused slice after slice."""
        state = self._local
        if not hasattr(state, "workspace"):
            state.buffers = [ReadBuffer() for _ in self.checkpoints]
            state.base_buffer = ReadBuffer()
            state.workspace = Workspace()
        return state

    def _fail_fast(self) -> None:
        """Stop early when a background hash already failed (the output will not be published)."""
        for future in self.pending:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _progress(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last_log >= 10:
            self.last_log = now
            log.info("merged %.2f GB of tensors", self.done_bytes / 1e9)


def _slices(numel: int, step: int):
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


def _torch_dtype(code: str):
    return SAFETENSORS_DTYPES[code]
