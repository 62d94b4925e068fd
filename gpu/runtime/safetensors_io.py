"""Reading safetensors weights straight into device tensors (torch imported lazily).

:func:`gpufleet.gpu.checkpoint_format.read_header` parses a file's header into
:class:`~gpufleet.gpu.checkpoint_format.TensorEntry` records (dtype, shape, byte range), for the planner too.
:class:`StagedReader` fills tensors that already live on the target device from those byte ranges, so the model is never
held whole in host memory:

- each tensor's bytes are cut into :class:`Piece` reads of at most ``chunk_bytes``, on element boundaries, and
  the pieces of all shards are interleaved so several files are read at once;
- a pool of reader threads ``pread``s the pieces. On the CPU they read straight into the parameters' memory.
  On CUDA each thread owns two pinned staging buffers and a stream: while one buffer's host→device copy runs,
  it reads the next piece into the other (double buffering; an event per buffer says when it is free again);
- the pinned staging buffers are allocated once and reused across loads (:meth:`StagedReader.release_staging`
  frees them); host memory beyond them is at most a tensor's worth while converting dtypes on the CPU.

Deciding *what* to read is not this module's job (the meta skeleton and key matching are
:mod:`gpufleet.gpu.runtime.skeleton`'s; tying and falling back, :mod:`gpufleet.gpu.runtime.loader`'s): this module only
moves bytes.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.checkpoint_format import TensorEntry

if TYPE_CHECKING:
    import torch

CHUNK_ALIGN_BYTES = 4096
_WORKER_DONE = -1  # what a reader thread puts on the progress queue when it stops

# --------------------------------------------------------------------------------------------------------------
# Reading pieces into device tensors


@dataclass
class Piece:
    """One read: ``nbytes`` at ``offset`` of ``fd`` into elements [start, start + count) of ``dest``."""

    fd: int
    offset: int
    nbytes: int
    dest: Any  # a flat, contiguous torch tensor on the target device
    start: int  # first element of dest written (in dest's dtype)
    count: int  # elements written
    src_dtype: Any  # torch dtype of the bytes on disk


def interleave_files(pieces: list[Piece]) -> list[Piece]:
    """The pieces reordered so consecutive reads go to different files: shards are read in parallel."""
    rank: dict[int, int] = {}
    ranked = []
    for piece in pieces:
        rank[piece.fd] = rank.get(piece.fd, -1) + 1
        ranked.append((rank[piece.fd], piece.fd, piece))
    return [piece for _, _, piece in sorted(ranked, key=lambda r: (r[0], r[1]))]


class StagedReader:
    """Reads :class:`Piece` lists into device tensors with ``read_threads`` threads through reused pinned staging.

    Not for concurrent use: the staging buffers are shared between calls, so callers serialize :meth:`read`
    and :meth:`release_staging` (:class:`gpufleet.gpu.runtime.loader.FastSafetensorsLoader` holds a lock around both).
    """

    def __init__(self, *, read_threads: int, chunk_bytes: int) -> None:
        """Args:
        read_threads: reader threads per :meth:`read`.
        chunk_bytes: the largest single read, and the size of each pinned staging buffer (two per thread).
        """
        self.read_threads = read_threads
        self.chunk_bytes = chunk_bytes
        self._staging: list[torch.Tensor] = []  # pinned, reused across loads

    def release_staging(self) -> None:
        """Free the pinned staging buffers (they are allocated again by the next CUDA read)."""
        self._staging = []

    def cut(self, entry: TensorEntry, fd: int, dest: torch.Tensor, src_dtype: torch.dtype) -> list[Piece]:
        """Split one tensor's bytes into reads of at most ``chunk_bytes``, on element boundaries."""
        per_piece = max(1, self.chunk_bytes // src_dtype.itemsize)
        count = dest.numel()
        return [
            Piece(
                fd=fd,
                offset=entry.offset + start * src_dtype.itemsize,
                nbytes=min(per_piece, count - start) * src_dtype.itemsize,
                dest=dest,
                start=start,
                count=min(per_piece, count - start),
                src_dtype=src_dtype,
            )
            for start in range(0, count, per_piece)
        ]

    def read(
        self,
        pieces: list[Piece],
        total_bytes: int,
        target: torch.device,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Read every piece with the thread pool, reporting progress from this (the calling) thread.

        Args:
            pieces: the reads, in the order they are handed to the threads.
            total_bytes: the sum of the pieces' ``nbytes``.
            target: the device the pieces' ``dest`` tensors live on.
            progress: called with (bytes done, total_bytes) about a hundred times, last with (total, total).

        Raises:
            OSError: a read failed or a file ended early (re-raised from the reader thread).
        """
        work: queue.SimpleQueue[Piece | None] = queue.SimpleQueue()
        for piece in pieces:
            work.put(piece)
        n_threads = min(self.read_threads, max(1, len(pieces)))
        for _ in range(n_threads):
            work.put(None)
        done: queue.SimpleQueue[int] = queue.SimpleQueue()
        stop = threading.Event()
        cuda = target.type == "cuda"
        staging = self._staging_buffers(n_threads) if cuda else []
        worker = self._cuda_worker if cuda else self._cpu_worker
        with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="fast-load") as pool:
            futures: list[Future[None]] = [
                pool.submit(worker, work, done, stop, target, staging[2 * i : 2 * i + 2]) for i in range(n_threads)
            ]
            reported = 0
            step = max(1, total_bytes // 100)  # about a hundred progress calls per load
            bytes_done = 0
            finished = 0
            while finished < n_threads:
                n_bytes = done.get()
                if n_bytes == _WORKER_DONE:
                    finished += 1
                    continue
                bytes_done += n_bytes
                if progress is not None and bytes_done - reported >= step and bytes_done < total_bytes:
                    progress(bytes_done, total_bytes)
                    reported = bytes_done
            for future in futures:
                future.result()  # re-raises a reader's error
        if progress is not None:
            progress(total_bytes, total_bytes)

    def _staging_buffers(self, n_threads: int) -> list[torch.Tensor]:
        import torch

        if len(self._staging) < 2 * n_threads:
            self._staging = [
                torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2 * n_threads)
            ]
        return self._staging

    @staticmethod
    def _cpu_worker(
        work: queue.SimpleQueue[Piece | None],
        done: queue.SimpleQueue[int],
        stop: threading.Event,
        target: torch.device,
        _staging: list[torch.Tensor],
    ) -> None:
        import torch

        scratch: torch.Tensor | None = None
        try:
            while (piece := work.get()) is not None and not stop.is_set():
                dest = piece.dest
                if piece.src_dtype == dest.dtype:
                    # Same dtype on the CPU: the parameter's own memory is the read buffer.
                    byte_offset = piece.start * dest.element_size()
                    _pread_full(piece.fd, _address_view(dest, byte_offset, piece.nbytes), piece.offset)
                else:
                    if scratch is None or scratch.numel() < piece.nbytes:
                        scratch = torch.empty(piece.nbytes, dtype=torch.uint8)
                    _pread_full(piece.fd, _address_view(scratch, 0, piece.nbytes), piece.offset)
                    src = scratch[: piece.nbytes].view(piece.src_dtype)
                    dest[piece.start : piece.start + piece.count].copy_(src)
                done.put(piece.nbytes)
        except BaseException:
            stop.set()
            raise
        finally:
            done.put(_WORKER_DONE)

    @staticmethod
    def _cuda_worker(
        work: queue.SimpleQueue[Piece | None],
        done: queue.SimpleQueue[int],
        stop: threading.Event,
        target: torch.device,
        staging: list[torch.Tensor],
    ) -> None:
        import torch

        try:
            with torch.cuda.device(target):
                stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                try:
                    _cuda_copy_loop(work, stop=stop, target=target, staging=staging, stream=stream, done=done)
                finally:
                    # Also on errors: no copy may still read a staging buffer the next load reuses.
                    stream.synchronize()
        except BaseException:
            stop.set()
            raise
        finally:
            done.put(_WORKER_DONE)


def _cuda_copy_loop(
    work: queue.SimpleQueue[Piece | None],
    *,
    stop: threading.Event,
    target: torch.device,
    staging: list[torch.Tensor],
    stream: torch.cuda.Stream,
    done: queue.SimpleQueue[int],
) -> None:
    """Read pieces into two pinned buffers in turn, each copied to the device on ``stream`` as soon as read."""
    import torch

    events: list[torch.cuda.Event | None] = [None, None]
    scratch: torch.Tensor | None = None  # device bytes for dtype conversion on the GPU
    slot = 0
    with torch.cuda.stream(stream):
        while (piece := work.get()) is not None and not stop.is_set():
            event = events[slot]
            if event is not None:
                event.synchronize()  # this buffer's previous copy has finished
            buffer = staging[slot][: piece.nbytes]
            _pread_full(piece.fd, _address_view(buffer, 0, piece.nbytes), piece.offset)
            dest = piece.dest[piece.start : piece.start + piece.count]
            if piece.src_dtype == dest.dtype:
                dest.view(torch.uint8).copy_(buffer, non_blocking=True)
            else:
                # Convert on the device: the stream orders the next use of scratch after this one.
                if scratch is None:
                    scratch = torch.empty(staging[slot].numel(), dtype=torch.uint8, device=target)
                raw = scratch[: piece.nbytes]
                raw.copy_(buffer, non_blocking=True)
                dest.copy_(raw.view(piece.src_dtype))
            recorded = torch.cuda.Event()  # type: ignore[no-untyped-call]
            recorded.record(stream)
            events[slot] = recorded
            slot = 1 - slot
            done.put(piece.nbytes)


def _address_view(tensor: torch.Tensor, byte_offset: int, nbytes: int) -> memoryview:
    """A writable memoryview over ``nbytes`` of a CPU tensor's memory, for ``os.preadv`` to read into."""
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr() + byte_offset)
    return memoryview(array).cast("B")


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (pread may return short counts)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got
