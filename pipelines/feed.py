"""Batches prepared ahead of the training step: host batches in, device batches out.

    for b in epoch_feed(shard, cfg, epoch, rank, device, channels_last, train=True, batch_size=64):
        train_step(...)

A thread takes the next host batches and runs prepare on them (the copy from pinned memory to the
GPU, or the augmentation on the GPU) on a CUDA stream of its own, while the training step runs on
the default stream. Decoding on the GPU has a thread of its own before it, a batch or two ahead: the
batched decoder returns only when its batch is decoded, and meanwhile the other thread launches
the previous batch's augmentation. The training stream waits on an event recorded after each
batch, not the host: nothing here makes a thread wait for the GPU. On a CPU the thread still
overlaps the next batch's host work (Ray Data, decoding) with the step's.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

from pipelines.codecs import device_stream
from pipelines.config import Config
from pipelines.data import epoch_batches, to_device, usable_rows
from pipelines.gpu_decode import BatchAugment, Decoded


class DeviceBatch(NamedTuple):
    x: torch.Tensor        # the model's input, on the device
    y: torch.Tensor        # labels on the device; -1: a placeholder that counts for nothing
    rows: int              # rows the host batch held, skipped ones included
    skipped: int           # rows that could not be decoded
    idx: np.ndarray | None = None  # the host batch's rows' global numbers (planned training rows), on the host

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


_DONE = object()


class _Failed(NamedTuple):
    error: BaseException


def device_batches(batches: Iterable, prepare: Callable[[dict], DeviceBatch | None], device: torch.device,
                   ahead: int = 2, label: str = "feed: prepare"):
    """prepare(batch) for each host batch, up to ahead batches in advance (0: in this thread, one
    at a time). A batch for which prepare returns None is left out. An error in the thread is
    raised here, in the consumer's thread. With ahead, the work starts now, not at the first next().
    label names the thread's work in a profile (pipelines/profiling.py names the thread by it)."""
    if ahead > 0:
        return Prefetch(batches, prepare, device, ahead, label)
    return (out for batch in batches if (out := prepare(batch)) is not None)


class Prefetch:
    """device_batches' iterator with a thread that prepares ahead on a CUDA stream of its own.
    close() stops the thread (train_epoch's finally, or an epoch started early and not used)."""

    def __init__(self, batches: Iterable, prepare: Callable, device: torch.device, ahead: int, label: str):
        self.cuda, self.label = device.type == "cuda", label
        if self.cuda and device.index is None:  # "cuda" means the current device of each thread: pin it down
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.prepare = device, prepare
        # One stream for every feed on this GPU: PyTorch's caching allocator reuses a freed block only
        # for the stream it was allocated on, so a stream for each epoch's feed (drawn in turn from
        # PyTorch's pool of 32) would cache a copy of the feed's working memory for each.
        self.side = device_stream(device, "feed") if self.cuda else None
        self.ready: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.ended = False
        self.source = iter(batches)
        self.thread = threading.Thread(target=self._work, name="device-batches", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            # The source too is read on the side stream: it may be another Prefetch (decode, then augment).
            with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
                for batch in self.source:
                    with torch.profiler.record_function(self.label):
                        out = self.prepare(batch)
                    batch = None  # not held on the device while the next one is awaited
                    event = torch.cuda.Event() if self.cuda else None
                    if event is not None:
                        event.record(self.side)
                    if out is not None and not self._put((out, event)):
                        return
                    out = None
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
            self._put(_Failed(e))
        finally:  # a consumer that stopped early: end the source's iteration here, while Ray is up
            getattr(self.source, "close", lambda: None)()

    def __iter__(self):
        return self

    def __next__(self):
        if self.ended:
            raise StopIteration
        item = self.ready.get()
        if item is _DONE or isinstance(item, _Failed):
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item.error
        out, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in out.tensors():  # the allocator must not reuse their memory before this stream is done
                t.record_stream(stream)
        return out

    def close(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.ready.get_nowait()
        self.thread.join(timeout=30)

    def __del__(self):
        self.stop.set()


def epoch_feed(source, cfg: Config, epoch: int, rank: int, device: torch.device, channels_last: bool, train: bool,
               batch_size: int):
    """One epoch of a Dataset's or a Train worker's DataIterator as DeviceBatches, data.prefetch_batches
    ahead: decoded and augmented on the device (cfg.decode_on_device), or decoded by Ray Data on
    the CPUs and copied from pinned memory. Undecodable rows are taken out and counted; a training
    batch of nothing else keeps one placeholder (label -1), so a DDP worker still steps.
    Starts at once: the first batches are on their way before the first next(). Training's random
    streams (crop boxes, flips, colour noise) are functions of (seed, epoch, rank), so a batch is the
    same whenever it was prepared."""
    data = cfg.data
    generator = None
    if train and data.pca_lighting:  # the colour noise's stream (2: apart from the crops' streams below)
        seed = np.random.SeedSequence([cfg.run.seed, epoch, rank, 2]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
    host = epoch_batches(source, data, epoch, cfg.run.seed, batch_size, train=train,
                         pin=device.type == "cuda" and not cfg.decode_on_device)
    if cfg.decode_on_device:
        # crop boxes and flips: a stream of their own per (seed, epoch, rank, split)
        augment = BatchAugment(data, train, device, np.random.default_rng([cfg.run.seed, epoch, rank, train]),
                               channels_last=channels_last, generator=generator)
        # Two threads: the next batch decodes while this one's augmentation is launched.
        host = device_batches(host, augment.decode, device, ahead=min(data.prefetch_batches, 1),
                              label="feed: decode")

        def prepare(d: Decoded) -> DeviceBatch:
            x, y, skipped = augment.augment(d, keep_one=train)
            return DeviceBatch(x, y, d.rows, skipped, d.idx)
    else:
        def prepare(b: dict) -> DeviceBatch:
            rows, idx = len(b["label"]), b.get("idx")
            b, skipped = usable_rows(b, keep_one=train)
            x, y = to_device(b, device, data, channels_last=channels_last, generator=generator)
            return DeviceBatch(x, y, rows, skipped, idx)
    return device_batches(host, prepare, device, ahead=data.prefetch_batches,
                          label="feed: augment" if cfg.decode_on_device else "feed: to the device")
