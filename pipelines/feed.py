"""Batches prepared ahead of the training step: host batches in, device batches out.

    for b in epoch_feed(shard, cfg, epoch, rank, device, channels_last, train=True, batch_size=64):
        train_step(...)

A thread takes the next host batches and runs prepare on them (the copy from pinned memory to the
GPU, or the decode and augmentation on the GPU) on a CUDA stream of its own, while the training
step runs on the default stream. The training stream waits on an event recorded after each
batch, not the host: nothing here makes the CPU wait for the GPU. On a CPU the thread still
overlaps the next batch's host work (Ray Data, decoding) with the step's.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

from pipelines.config import Config
from pipelines.data import epoch_batches, to_device, usable_rows
from pipelines.gpu_decode import BatchAugment


class DeviceBatch(NamedTuple):
    x: torch.Tensor        # the model's input, on the device
    y: torch.Tensor        # labels on the device; -1: a placeholder that counts for nothing
    rows: int              # rows the host batch held, skipped ones included
    skipped: int           # rows that could not be decoded
    idx: np.ndarray | None = None  # the host batch's rows' global numbers (planned training rows), on the host


_DONE = object()


class _Failed(NamedTuple):
    error: BaseException


def device_batches(batches: Iterable, prepare: Callable[[dict], DeviceBatch | None], device: torch.device,
                   ahead: int = 2):
    """prepare(batch) for each host batch, up to ahead batches in advance (0: in this thread, one
    at a time). A batch for which prepare returns None is left out. An error in the thread is
    raised here, in the consumer's thread."""
    if ahead <= 0:
        for batch in batches:
            if (out := prepare(batch)) is not None:
                yield out
        return
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # "cuda" means the current device of each thread: pin it down
        device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    source = iter(batches)

    def work():
        try:
            if cuda:
                torch.cuda.set_device(device)
            for batch in source:
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    out = prepare(batch)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(side)
                if out is not None and not put((out, event)):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
            put(_Failed(e))
        finally:  # a consumer that stopped early: end the source's iteration here, while Ray is up
            getattr(source, "close", lambda: None)()

    thread = threading.Thread(target=work, name="device-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            out, event = item
            if event is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
                for t in (out.x, out.y):  # the allocator must not reuse their memory before this stream is done
                    t.record_stream(stream)
            yield out
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                ready.get_nowait()
        thread.join(timeout=30)


def epoch_feed(source, cfg: Config, epoch: int, rank: int, device: torch.device, channels_last: bool, train: bool,
               batch_size: int, generator: torch.Generator | None = None):
    """One epoch of a Dataset's or a Train worker's DataIterator as DeviceBatches, data.prefetch_batches
    ahead: decoded and augmented on the device (cfg.decode_on_device), or decoded by Ray Data on
    the CPUs and copied from pinned memory. Undecodable rows are taken out and counted; a training
    batch of nothing else keeps one placeholder (label -1), so a DDP worker still steps.
    generator: the colour noise's stream (data.pca_lighting)."""
    data = cfg.data
    host = epoch_batches(source, data, epoch, cfg.run.seed, batch_size, train=train,
                         pin=device.type == "cuda" and not cfg.decode_on_device)
    if cfg.decode_on_device:
        # crop boxes and flips: a stream of their own per (seed, epoch, rank, split)
        augment = BatchAugment(data, train, device, np.random.default_rng([cfg.run.seed, epoch, rank, train]),
                               channels_last=channels_last, generator=generator)

        def prepare(b: dict) -> DeviceBatch:
            x, y, skipped = augment(b, keep_one=train)
            return DeviceBatch(x, y, len(b["key"]), skipped, b.get("idx"))
    else:
        def prepare(b: dict) -> DeviceBatch:
            rows, idx = len(b["label"]), b.get("idx")
            b, skipped = usable_rows(b, keep_one=train)
            x, y = to_device(b, device, data, channels_last=channels_last, generator=generator)
            return DeviceBatch(x, y, rows, skipped, idx)
    return device_batches(host, prepare, device, ahead=data.prefetch_batches)
