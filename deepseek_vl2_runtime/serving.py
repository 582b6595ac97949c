"""Serving concerns that are not Cog's API and not the model: how Cog's inputs become files, which
of those files may be read, what a user is told when something fails, and returning memory.

Used by predict.py; kept here so the Cog adapter stays a thin mapping of inputs to the runtime.

How a Cog input reaches predict() (cog 0.23.1 / coglet 0.23.1, read from the installed wheels):

1. coglet's worker calls ``cog._inspector.check_input`` -> ``cog._adt`` ``normalize`` ->
   ``cog.types.Path.validate(value)`` for every ``Path`` input. A string that is not an http(s)
   or data URL stays a plain ``str`` (coglet hands it over as-is). A URL becomes a ``URLPath``:
   ``urllib.parse.urlparse`` runs on the whole string three times (``Path.validate``,
   ``get_filename``, ``File.validate``), and a data URL is decoded by
   ``urllib.request.urlopen`` into a ``BytesIO``; an http(s) URL gets a lazy ``URLFile``.
2. Before predict() runs, coglet calls ``URLPath.convert()`` for each of them (in a thread pool):
   it writes the content to ``tempfile.NamedTemporaryFile(suffix=<file name>, delete=False)``
   and returns a ``cog.types.Path`` to it, which is what predict() receives; for an http(s) URL
   that is where the download happens (``requests.get(url, stream=True, timeout=10)``, any
   host, any size). An exception raised there fails the prediction with
   "Input validation error: <its message>". After the prediction coglet unlinks the file.

`install_cog_input_hooks()` (called by predict.py's setup) hooks exactly these two places:

* ``urllib.parse.urlsplit`` keeps an LRU cache of its last 128 distinct inputs and results. Step 1
  puts every data URL in it (the string and a copy of it as the parsed path: ~2.7x the upload
  size), so a long-running worker kept up to 128 uploads alive -- gigabytes. Strings longer than
  `MAX_CACHED_URL` now bypass the cache (the parse is identical; only the caching differs).
* ``URLPath.convert`` is replaced by `_convert`: http(s) URLs are fetched by `download` (public
  internet addresses only, at most `MAX_IMAGE_BYTES`, with a deadline), and every file it
  writes is registered. `upload_path` accepts only those registered objects, so a path a
  request names -- even of a file sitting in the temp directory -- is never read.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import ipaddress
import logging
import os
import socket
import stat
import tempfile
import threading
import time
import traceback
import urllib.parse
import weakref
from typing import Any

import torch

from .errors import InputError
from .image_io import MAX_IMAGE_BYTES

log = logging.getLogger("deepseek_vl2_runtime.cog")


# -- what the user reads ----------------------------------------------------------------------
#
# coglet reports a failed prediction as "Prediction failed: Prediction failed: {type}: {message}"
# ("Prediction failed: Async prediction failed: ..." for an async predict()). Both prefixes are
# coglet's (strings in coglet/_impl.abi3.so); "{type}: {message}" is pyo3's rendering of the
# exception (PyErr's Display: the type's __qualname__, then str(exc)). The type is ours to
# name, so the two user-facing exceptions carry a label instead of a Python class name.


class InvalidInput(InputError):
    """A request the user can fix (what predict() raises for any `InputError`)."""

    __qualname__ = "Invalid input"


class PredictionError(RuntimeError):
    """A prediction that failed on the server's side (not the request's fault); user-facing."""

    __qualname__ = "Server error"


def user_error(exc: BaseException | str) -> InvalidInput:
    """`exc` (an `InputError` or its message) as the exception predict() raises for it."""
    if isinstance(exc, InvalidInput):
        return exc
    return InvalidInput(str(exc))


# -- Cog's input machinery: the hooks ---------------------------------------------------------

MAX_CACHED_URL = 2048
"""Longest string `urllib.parse.urlsplit` still caches (a web URL is far shorter)."""

MAX_URL_LENGTH = 8192
"""Longest http(s) URL fetched."""

MAX_REDIRECTS = 5
DOWNLOAD_TIMEOUT_S = 120.0
"""Deadline for a whole download (each connect/read also times out after 10 s, as in Cog)."""

ALLOW_HOSTS_ENV = "DEEPSEEK_VL2_URL_ALLOW_HOSTS"
"""Comma-separated `host` or `host:port` entries fetched even though their address is not
public (e.g. an internal image store). Empty by default: only public addresses are fetched."""

_hooks_lock = threading.Lock()


def install_cog_input_hooks() -> None:
    """Bound urlsplit's cache and take over `cog.types.URLPath.convert` (idempotent)."""
    import cog.types

    with _hooks_lock:
        if not getattr(urllib.parse.urlsplit, "_bounded", False):
            urllib.parse.urlsplit = _bounded_urlsplit(urllib.parse.urlsplit)
        # Drop anything cached before. (typeshed declares urlsplit a plain function; CPython
        # wraps it in functools.lru_cache.)
        urllib.parse.urlsplit.cache_clear()  # type: ignore[attr-defined]
        cog.types.URLPath.convert = _convert


def _bounded_urlsplit(cached):
    """`urllib.parse.urlsplit` whose cache never holds a string longer than MAX_CACHED_URL.

    ``urlparse`` (what Cog calls) looks ``urlsplit`` up in the module at each call, so replacing
    the module attribute covers it. The uncached function is ``cached.__wrapped__``."""
    uncached = cached.__wrapped__

    @functools.wraps(uncached)
    def urlsplit(url, scheme="", allow_fragments=True):
        if len(url) > MAX_CACHED_URL:
            return uncached(url, scheme, allow_fragments)
        return cached(url, scheme, allow_fragments)

    urlsplit.__dict__.update(
        cache_info=cached.cache_info, cache_clear=cached.cache_clear, _bounded=True
    )
    return urlsplit


def _convert(self):  # replaces cog.types.URLPath.convert; `self` is a URLPath
    """Materialise a URL input as a registered file in the temp directory (see module doc)."""
    if self._path is None:
        scheme = self.source[:8].partition(":")[0].lower()
        if scheme in ("http", "https"):
            self._path = download(self.source, self.filename)
        else:  # data: URL, already decoded by Cog into a BytesIO
            self._path = _store(self.fileobj, self.filename)
    return self._path


# -- the files predict() may read -------------------------------------------------------------

_issued: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_issued_lock = threading.Lock()


def register_upload(path: str | os.PathLike[str]):
    """The `cog.types.Path` object predict() accepts for the file `path` that the server itself
    just wrote for a request (what `_convert` returns; tests use it to fake an upload).

    The object is the token: `upload_path` accepts exactly the objects made here, while they
    are alive, and only while the file is still the one that was written (same device, inode,
    change time and size). A string naming the same file -- which is all a request can send -- is refused."""
    import cog.types

    obj = cog.types.Path(os.fspath(path))
    st = os.lstat(obj)
    obj._upload_identity = _identity(st)
    with _issued_lock:
        _issued[id(obj)] = obj
    return obj


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # The inode alone is not enough: a deleted file's inode number is often reused at once.
    # Any later change to the file (or a new file in its place) also changes its ctime.
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)


def _new_upload_file(filename: str):
    # As Cog does: the input's file name as the suffix, in tempfile.gettempdir().
    return tempfile.NamedTemporaryFile(suffix=filename, delete=False)


def _store(fileobj, filename: str):
    import shutil

    with _new_upload_file(filename) as dest:
        shutil.copyfileobj(fileobj, dest)
    return register_upload(dest.name)


def upload_path(value: object, name: str = "image") -> str:
    """The real path of the file the server downloaded for an image input, or `InvalidInput`.

    Only objects returned by `register_upload` for this process's downloads are accepted: Cog
    turns http(s) and data URLs into such files before predict() runs, and hands any other
    string over unchanged -- a path, even of a file sitting in the temp directory, is refused.
    The file must still be the regular file that was written (unchanged, not replaced by
    another file or a symlink), directly in the temp directory. Every refusal has the same message (only the
    caller's own value is echoed), so it tells nothing about which files exist. Nothing is
    opened here."""
    shown = str(value) if isinstance(value, (str, os.PathLike)) else repr(value)
    shown = repr(shown if len(shown) <= 80 else shown[:77] + "...")
    refusal = InvalidInput(
        f"{name}: {shown} is not an uploaded file. Send the image as an http(s):// URL or a "
        "data: URL (e.g. data:image/png;base64,...); paths and other URL schemes (file://, "
        "ftp://) are not accepted."
    )
    with _issued_lock:
        issued = _issued.get(id(value)) is value
    if not issued or not isinstance(value, os.PathLike):  # every issued one is a cog.types.Path
        raise refusal
    try:
        real = os.path.realpath(value)
        st = os.lstat(real)
        accepted = (
            os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
            and stat.S_ISREG(st.st_mode)
            and _identity(st) == getattr(value, "_upload_identity", None)
        )
    except (OSError, ValueError, TypeError, AttributeError):
        accepted = False
    if not accepted:
        raise refusal
    return real


# -- http(s) inputs ---------------------------------------------------------------------------


SEND_ANOTHER = (
    "Send a public http(s) URL, or the image itself as a data: URL (data:image/png;base64,...)"
)


def _not_fetched(url: str, why: str, advice: str = SEND_ANOTHER) -> InvalidInput:
    shown = url if len(url) <= 100 else url[:97] + "..."
    return InvalidInput(f"The image URL {shown} was not downloaded: {why}. {advice}.")


NOT_PUBLIC = "its host is not a public internet address"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """Whether `address` (an IP literal, optionally with a %scope) is a public unicast address:
    not loopback, private, link-local (cloud metadata 169.254.169.254), shared (100.64/10),
    reserved, unspecified or multicast, also when embedded in an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        candidates.append(inner)
    return all(c.is_global and not c.is_multicast for c in candidates)


def _allowed_hosts() -> set[str]:
    raw = os.environ.get(ALLOW_HOSTS_ENV, "")
    return {entry.strip().lower() for entry in raw.split(",") if entry.strip()}


def _is_allowed(host: str, port: int) -> bool:
    allowed = _allowed_hosts()
    return host.lower() in allowed or f"{host.lower()}:{port}" in allowed


def _check_target(url: str) -> tuple[str, int, bool]:
    """(host, port, allowed) for an http(s) URL whose host only resolves to public addresses
    (or is allowed by DEEPSEEK_VL2_URL_ALLOW_HOSTS); otherwise `InvalidInput`."""
    if len(url) > MAX_URL_LENGTH:
        raise _not_fetched(url, f"it is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _not_fetched(url, "it is not a valid URL") from None
    host = parts.hostname
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise _not_fetched(url, "only http:// and https:// URLs with a host name are fetched")
    allowed = _is_allowed(host, port)
    if not allowed:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        # A name that does not resolve gets the same answer as a private one: no DNS oracle.
        if not infos or not all(is_public_address(str(info[4][0])) for info in infos):
            raise _not_fetched(url, NOT_PUBLIC)
    return host, port, allowed


class _RefusedPeer(Exception):
    """The connection reached a non-public address (e.g. DNS changed after the check)."""


def _public_connection(base: Any) -> Any:  # base: a urllib3 connection class
    class PublicOnly(base):
        """Checks the address actually connected to, so a DNS answer that changes between the
        check and the connection (rebinding) cannot reach an internal host."""

        def _new_conn(self):
            sock = super()._new_conn()
            peer = sock.getpeername()[0]
            if not is_public_address(peer) and not _is_allowed(self.host, self.port):
                sock.close()
                raise _RefusedPeer(peer)
            return sock

    return PublicOnly


def _session():
    import requests
    import urllib3

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = _public_connection(urllib3.connection.HTTPConnection)

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = _public_connection(urllib3.connection.HTTPSConnection)

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    session = requests.Session()
    # Through a proxy the peer is the proxy (the operator's choice); the target's name was
    # checked above. Without one, the adapter checks every connection it makes.
    adapter = Adapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def download(url: str, filename: str):
    """Fetch an http(s) image input into a registered temp file (what Cog's convert would do,
    but only from public addresses, at most MAX_IMAGE_BYTES, within DOWNLOAD_TIMEOUT_S).
    Redirects are followed (at most MAX_REDIRECTS) and each target is checked again."""
    import requests

    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    headers = {"User-Agent": ua} if (ua := os.getenv("COG_USER_AGENT")) else {}
    shown_url = url
    with _session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            _check_target(url)
            try:
                response = session.get(
                    url, stream=True, timeout=10, headers=headers, allow_redirects=False
                )
            except _RefusedPeer:
                raise _not_fetched(shown_url, NOT_PUBLIC) from None
            except requests.Timeout:
                raise _not_fetched(shown_url, "the server did not answer in time") from None
            except requests.RequestException:
                raise _not_fetched(shown_url, "could not connect to its server") from None
            if response.is_redirect:
                location = response.headers.get("location", "")
                response.close()
                url = urllib.parse.urljoin(url, location)
                continue
            with response:
                return _save_response(response, shown_url, filename, deadline)
        raise _not_fetched(shown_url, f"more than {MAX_REDIRECTS} redirects")


def _too_big(url: str, size: int | None = None) -> InvalidInput:
    got = f"{size:,} bytes, " if size is not None else ""
    return _not_fetched(
        url,
        f"the file is {got}more than the limit of {MAX_IMAGE_BYTES:,} bytes "
        f"({MAX_IMAGE_BYTES / 2**20:.0f} MiB)",
        "Please send a smaller file, for example re-saved as JPEG or at a lower resolution",
    )


def _save_response(response, url: str, filename: str, deadline: float):
    import requests
    import urllib3

    if response.status_code >= 400:
        raise _not_fetched(url, f"its server answered HTTP {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
        raise _too_big(url, int(declared))  # refused before the body is read
    dest = _new_upload_file(filename)
    try:
        with dest:
            total = 0
            # read1: returns what has arrived (a trickling server cannot hold a read past the
            # deadline for longer than the 10 s read timeout); decoded bytes are counted, so a
            # gzip-encoded body counts unpacked.
            while chunk := response.raw.read1(1 << 16, decode_content=True):
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise _too_big(url)
                if time.monotonic() > deadline:
                    raise _not_fetched(url, f"it took longer than {DOWNLOAD_TIMEOUT_S:.0f} s")
                dest.write(chunk)
        return register_upload(dest.name)
    except (requests.RequestException, OSError, urllib3.exceptions.HTTPError):
        os.unlink(dest.name)
        raise _not_fetched(url, "the download was interrupted") from None
    except BaseException:
        os.unlink(dest.name)
        raise


# -- memory -----------------------------------------------------------------------------------

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
    """What the user reads when a prediction fails for a reason that is not their input. The
    exception itself (type, message, traceback) goes to the server log only."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "server"
        return (
            f"The {where} ran out of memory while answering this request, so it was stopped and "
            "the memory was released. Please try again; if it happens again, send fewer or "
            "smaller images, a shorter prompt or a lower max_length_tokens."
        )
    return (
        "The prediction failed because of an internal server error. This is not a problem with "
        "your input; the error was logged. Please try again."
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
