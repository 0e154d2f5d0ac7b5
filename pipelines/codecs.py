"""Which image decoders this installation has: TorchCodec's when it loads with the installed torch,
else torchvision's. No Ray here.

    image = decode_image(data)                        # bytes -> uint8 3 x H x W on the CPU
    images = decode_jpegs([data, ...], device)        # a batch of JPEGs in one call (nvJPEG on a GPU)
    DECODER                                           # "torchcodec" or "torchvision": which one loaded

TorchCodec's builds follow torch's releases (0.12 and later load with torch >= 2.11; before that each
took one torch release, docs/gpu.md has the table). Where its libraries were built for another torch,
or it is not installed (the GPU machine's image), importing it raises: torchvision's decoders, which
ship with every torch, take over. Both return the same pixels for a JPEG (libjpeg-turbo).
"""
from __future__ import annotations

import logging
import threading
import warnings

import torch

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def _torchcodec():
    from torchcodec.decoders import decode_image, decode_jpeg  # raises when its libraries do not load
    return "torchcodec", decode_image, decode_jpeg


def _torchvision():
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_image
    from torchvision.io import decode_jpeg as tv_jpeg

    # Set once for the process, for these two messages alone: warnings.catch_warnings around each
    # call would swap the process's list of filters from several threads at once (the feed's, Ray
    # Data's), which can leave "ignore everything" in place for good.
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                            DeprecationWarning)  # in favour of TorchCodec, from torchvision 0.29
    warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)  # the decoders only read

    def as_tensor(data):
        """The encoded bytes as a uint8 tensor, not copied (a copy of a batch's JPEGs costs about as
        much host time as the rest of its augmentation). The decoders only read it."""
        return data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)

    def decode_image(data, mode="RGB"):
        return tv_image(as_tensor(data), mode=ImageReadMode.RGB)

    def decode_jpeg(data, mode="RGB", device="cpu"):
        if isinstance(data, (list, tuple)):
            return tv_jpeg([as_tensor(d) for d in data], mode=ImageReadMode.RGB, device=device)
        return tv_jpeg(as_tensor(data), mode=ImageReadMode.RGB, device=device)

    return "torchvision", decode_image, decode_jpeg


try:
    DECODER, _decode_image, _decode_jpeg = _torchcodec()
except Exception as e:  # ImportError, or OSError/RuntimeError from libraries built for another torch
    log.info("TorchCodec does not load here (%s: %s); decoding with torchvision", type(e).__name__, e)
    DECODER, _decode_image, _decode_jpeg = _torchvision()


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes (JPEG, PNG, WebP, ...) -> uint8 RGB tensor, 3 x H x W, on the CPU."""
    return _decode_image(data, mode="RGB")


def decode_jpegs(batch: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """A batch of JPEGs -> a list of uint8 RGB tensors, 3 x H x W, decoded on device in one call:
    on a GPU nvJPEG decodes the whole batch at once. Raises if any of them cannot be decoded."""
    if device.type != "cuda":
        return _decode_jpeg(list(batch), mode="RGB", device=device)
    # nvJPEG writes its outputs on a stream of its own, which does not wait for the caller's stream,
    # into memory allocated on the caller's stream (torchvision's decode_jpegs_cuda.cpp): memory
    # that kernels queued there still read could be overwritten. So the outputs are allocated on a
    # stream that runs no kernel; the caller's stream waits for the decode, and the allocator reuses
    # their memory only once the caller's stream is done with them. No thread waits for the GPU.
    user, alloc = torch.cuda.current_stream(device), device_stream(device, "decoded images")
    with torch.cuda.stream(alloc):
        images = _decode_jpeg(list(batch), mode="RGB", device=device)
    user.wait_stream(alloc)
    for image in images:
        image.record_stream(user)
    return images


_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def device_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One CUDA stream per GPU for each role, kept for the process (pipelines.feed's is another)."""
    with _STREAMS_LOCK:
        if (device, role) not in _STREAMS:
            _STREAMS[device, role] = torch.cuda.Stream(device)
        return _STREAMS[device, role]
