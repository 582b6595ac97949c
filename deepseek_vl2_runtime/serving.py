"""Serving concerns that are not Cog's API and not the model: which uploaded files may be read,
what a user is told when the server (not their input) fails, and returning memory after it.

Used by predict.py; kept here so the Cog adapter stays a thin mapping of inputs to the runtime.
"""

import ctypes
import gc
import logging
import os
import tempfile
import traceback
from typing import Any

import torch

from .errors import InputError

log = logging.getLogger("deepseek_vl2_runtime.cog")


class PredictionError(RuntimeError):
    """A prediction that failed on the server's side (not the request's fault); user-facing."""


def upload_path(value: object, name: str = "image") -> str:
    """The real path of the file Cog downloaded for an image input, or `InputError`.

    Cog turns http(s) and data URLs into files directly in the worker's temp directory
    (`tempfile.gettempdir()`, e.g. /tmp/tmpoue1aretfile.png); any other string reaches predict()
    unchanged. Only existing regular files that are direct children of that directory are
    accepted (symlinks and `..` resolved first): not a nested path, which could be a checkout
    or another program's data under /tmp, so a request can never make the server open one of
    its own files. Nothing is opened here.
    """
    shown = str(value)
    shown = repr(shown if len(shown) <= 80 else shown[:77] + "...")
    refusal = InputError(
        f"{name}: {shown} is not an uploaded file. Send the image as an http(s):// URL or a "
        "data: URL (e.g. data:image/png;base64,...); paths and other URL schemes (file://, "
        "ftp://) are not accepted."
    )
    if not isinstance(value, (str, os.PathLike)):
        raise refusal
    try:
        real = os.path.realpath(os.fspath(value))
        temp_dir = os.path.realpath(tempfile.gettempdir())
        accepted = os.path.dirname(real) == temp_dir and os.path.isfile(real)
    except (OSError, ValueError, TypeError):  # NUL bytes, undecodable names, ...
        accepted = False
    if not accepted:
        raise refusal
    return real


MMAP_THRESHOLD = 1 << 20


def return_freed_memory_to_the_os() -> bool:
    """Make glibc serve allocations of MMAP_THRESHOLD (1 MiB) or more with mmap, always.

    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, after
    which large blocks -- decoded images (Pillow allocates 16 MiB blocks), pixel tensors,
    activations -- come from the heap and stay in the process when freed. A server that sees a
    24-megapixel photo then keeps ~300 MB more RSS for good, creeping as the heap fragments;
    with a fixed threshold the memory goes back to the OS after every request. Returns whether
    the setting was applied (False where the C library has no mallopt, e.g. macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also disables the dynamic adjustment
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD))


def whole_number(value: Any) -> Any:
    """JSON has one number type: Cog passes 4096.0 (or -0) for an integer input as a float, and
    JSON Schema counts it as the integer 4096. Integral floats that a float represents exactly
    (|x| <= 2**53) become ints; anything else is left for `SamplingParams.validate` to refuse."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def free_memory() -> None:
    """Give back what a failed prediction held: unreachable objects, then cached GPU blocks."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def failure_message(exc: BaseException) -> str:
    """What the user reads when a prediction fails for a reason that is not their input."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "server"
        return (
            f"The {where} ran out of memory while answering this request, so it was stopped and "
            "the memory was released. Please try again; if it happens again, send fewer or "
            "smaller images, a shorter prompt or a lower max_length_tokens."
        )
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return (
        f"The prediction failed because of an internal server error ({type(exc).__name__}"
        f"{': ' + detail if detail else ''}). This is not a problem with your input; the error "
        "was logged. Please try again."
    )


def server_failure(exc: Exception) -> PredictionError:
    """Log `exc` with its traceback, drop the tensors its frames hold, free memory, and return
    the user-facing error to raise (outside the `except` block, so nothing chains to `exc`)."""
    log.error("prediction failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    message = failure_message(exc)
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    free_memory()
    return PredictionError(message)
