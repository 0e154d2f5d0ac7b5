"""Batches prepared ahead of the training step: host batches in, device batches out. No Ray here.

    for x, y, rows, skipped in device_batches(host_batches, prepare, device, ahead=2):
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

import torch


class DeviceBatch(NamedTuple):
    x: torch.Tensor        # the model's input, on the device
    y: torch.Tensor        # labels on the device; -1: a placeholder that counts for nothing
    rows: int              # rows the host batch held, skipped ones included
    skipped: int           # rows that could not be decoded


_DONE = object()


class _Failed(NamedTuple):
    error: BaseException


def device_batches(batches: Iterable, prepare: Callable[[dict], DeviceBatch | None], device: torch.device,
                   ahead: int = 2):
    """prepare(batch) for each host batch, up to ahead batches in advance (0: in this thread, one
    at a time). A batch prepare returns None for (nothing usable in it) is left out. Errors in
    the thread are raised here, in the consumer's thread."""
    if ahead <= 0:
        for batch in batches:
            if (out := prepare(batch)) is not None:
                yield out
        return
    cuda = device.type == "cuda"
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

    def work():
        try:
            if cuda:
                torch.cuda.set_device(device)
            for batch in batches:
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
