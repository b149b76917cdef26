"""Reading image references into RGB images, with every read bounded.

A reference is raw ``bytes``, a local path, an ``http(s)://`` URL or any
path a Beam filesystem understands (``gs://``, ``s3://``, ...). Every failure
is raised as :class:`ImageLoadError`, whose message names the reference and
the cause in plain words; nothing else escapes :func:`load_image`.

Reads are bounded by construction, whatever the reference points at:

- local paths are opened non-blocking and read only when the opened descriptor
  is a regular file (a named pipe cannot block the worker, a device such as
  ``/dev/zero`` is never read);
- no source gives more than ``max_bytes`` bytes (local, Beam filesystem, URL);
- a download has one deadline for the whole of it (connecting, headers and
  body), not one per socket operation, so a server that trickles bytes cannot
  hold the worker;
- with ``image_root``, the check is made on what was actually opened (the
  descriptor's own path), so swapping a folder for a symlink between a check
  and the open cannot escape the root;
- images declaring more than ``max_pixels`` pixels, or an aspect ratio over
  :data:`DEFAULT_MAX_ASPECT_RATIO` (``max_aspect_ratio``), are refused from their header, before any pixel is
  decoded; so are files whose header alone would cost far more to read than
  their size (a JPEG's EXIF or MPF tags sharing one value or a header of masses
  of markers, a GIF of masses of comments or blocks, a long PNM header, a large
  PNM that Pillow decodes in Python);
- only the raster formats in :data:`IMAGE_FORMATS` are decoded: formats whose
  decoders run other programs (EPS runs Ghostscript) or decode pixels before
  their size can be checked (ICO, ICNS) are refused by name.
"""

from __future__ import annotations

import functools
import http.client
import io
import itertools
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from beamcap.paths import has_scheme

DEFAULT_DOWNLOAD_TIMEOUT_SECS = 10.0
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
# Pillow's own decompression-bomb threshold (its default when a caller has set it to None).
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 178_956_970
_CHUNK = 1 << 20
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "PPM", "TGA", "JPEG2000", "AVIF")
"""The Pillow formats decoded (JPEG includes its multi-picture variant, MPO); where the installed Pillow has no
decoder for one of them, it is left out."""
MAX_JPEG_SCANS = 100
"""A JPEG with more scans is refused before decoding: each scan of a progressive JPEG is decoded over the whole
picture, so a small file repeating one scan thousands of times holds the worker for hours (libjpeg-turbo's tools
offer the same guard, ``-maxscans``). Encoders write 1 to about 20 scans."""
MAX_TILE_OVERHANG = 4
"""A TIFF whose tiles hold more than this many times its own pixels (and more than :data:`TILE_FLOOR`) is refused
before decoding: libtiff inflates a whole tile, so a 1x1 TIFF declaring 16384x16384 tiles takes ~1 GB."""
TILE_FLOOR = 4096 * 4096
"""Tiles up to this many pixels are always decoded (GDAL writes 512x512 tiles, even for small pictures)."""
DEFAULT_MAX_ASPECT_RATIO = 100
"""By default, an image whose long side is more than this many times its short side is refused before decoding
(the ``max_aspect_ratio`` parameter): processors
that scale the short side up to a fixed length (CLIP's, GIT's, LLaVA's) blow a 1x200000 picture of 862 bytes up
to 224x44,800,000 pixels, out of memory alone, which would fail the bundle. Panoramas and long receipts stay
well inside it; models that resize to a fixed square (BLIP) can take a higher limit."""
MAX_JPEG_HEADER_STEPS = 10_000
"""A JPEG whose header (up to its first scan) costs Pillow more steps than this is refused unread: each marker,
fill or junk byte is one (Pillow reads them one by one in Python), each 3 bytes of a frame header one (it keeps a
tuple for each), each KiB copied joining EXIF segments one (it joins them by copying). Honest headers take tens.
The markers after the header, up to the end of the first picture, are bounded by the same number."""
MAX_GIF_COMMENT_BYTES = 64 << 10
"""A GIF whose comments before its first picture hold more bytes than this is refused unread: Pillow joins
comment blocks by copying, in quadratic time (5 MB of comments took a minute). Honest comments are a line."""
MAX_GIF_BLOCKS = 100_000
"""A GIF with more blocks (extensions, their sub-blocks, bytes of junk) than this before its first picture is
refused unread: Pillow reads each in Python. Honest files hold a handful (an XMP packet some thousands)."""
MAX_PNM_HEADER_BYTES = 64 << 10
"""A PBM, PGM or PPM file whose header (its size and maximum value, with the comments and blanks among them) is
longer than this is refused unread: Pillow reads it a byte at a time in Python (8 MiB took 4 s). Honest headers
are tens of bytes."""
MAX_SLOW_PNM_BYTES = 16 << 20
"""A PNM file that Pillow decodes in Python (plain, ASCII PBM/PGM/PPM, and binary ones of a maximum value other
than 255, or 65535 for PGM) larger than this is refused unread: about 1 MB a second, so a 256 MB file would take
minutes. Other binary PNM files are decoded in C at any size."""
MAX_PLAIN_PNM_COMMENTS = 1_000
"""A plain PNM file with more comments than this is refused unread: Pillow copies its read buffer once for each
comment (half a million comments in 1 MB took 20 s)."""
TAG_DATA_SLACK = 1 << 20
"""A TIFF, or the EXIF of any image, whose tags declare more value bytes than its own size plus this is refused:
Pillow reads each tag's value into its own copy, so thousands of tags pointing at one shared block of a small file
claim gigabytes. (Each value of an honest file is stored once, so they cannot add up to more than the file.)"""


class ImageLoadError(Exception):
    """An image reference that could not be turned into an image."""

    def __init__(self, ref: Any, cause: str):
        self.ref = ref
        self.cause = cause
        super().__init__(f"image {describe_ref(ref)}: {cause}")


def describe_ref(ref: Any) -> str:
    """A short, printable name for an image reference."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"<{len(ref)} bytes>"
    text = repr(ref)
    return text if len(text) <= 200 else text[:197] + "..."


def printable(text: str, limit: int = 300) -> str:
    """``text`` as one printable line (control characters escaped) of at most ``limit`` characters: paths, and
    the messages of servers and decoders, come from the input and go into errors and logs."""
    if text.isprintable() and len(text) <= limit:
        return text
    text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(error: BaseException) -> str:
    return printable(str(error))


def _mebibytes(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _read_bounded(stream: Any, ref: Any, max_bytes: int, deadline: float | None = None) -> bytes:
    """At most ``max_bytes`` bytes from a binary stream; more is an error, and passing ``deadline`` raises
    :class:`TimeoutError`."""
    chunks, total = [], 0
    read = getattr(stream, "read1", stream.read)  # read1: one underlying read, so a trickle returns what it has
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("past the download's deadline")
        chunk = read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageLoadError(ref, f"refused: larger than the max_image_bytes limit of {_mebibytes(max_bytes)}")


# --- local files ----------------------------------------------------------------------------------------------


def _opened_path(fd: int) -> str | None:
    """The real path of an open descriptor (Linux /proc, macOS F_GETPATH), or None where the OS cannot tell."""
    if sys.platform.startswith("linux"):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
    getpath = getattr(__import__("fcntl"), "F_GETPATH", None) if os.name == "posix" else None
    if getpath is not None:
        import fcntl

        return fcntl.fcntl(fd, getpath, b"\0" * 1024).rstrip(b"\0").decode(errors="surrogateescape")
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a named pipe"),
                       (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
                       (stat.S_ISSOCK, "is a socket")):  # fmt: skip
        if test(mode):
            return name
    return "is not a regular file"


def read_local(ref: Any, path: str, max_bytes: int, root: str | None = None) -> bytes:
    """The bytes of a local regular file, at most ``max_bytes``; with ``root``, only if what was opened is under it.

    The file is opened non-blocking (a named pipe cannot block), then checked on the descriptor: a regular file
    (never a device, pipe or directory), and under ``root``, resolved from the descriptor itself (race-free).
    """
    if "\0" in path:
        raise ImageLoadError(ref, "the path contains a NUL character")
    tried = "" if path == ref else f" ({printable(path)})"  # the path tried, where it is not the reference itself
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageLoadError(ref, f"file not found{tried}") from None
    except PermissionError:
        raise ImageLoadError(ref, f"permission denied{tried}") from None
    except IsADirectoryError:
        raise ImageLoadError(ref, f"is a directory, not an image file{tried}") from None
    except (OSError, ValueError) as e:
        raise ImageLoadError(ref, f"cannot open{tried}: {getattr(e, 'strerror', None) or e}") from None
    try:
        if root is not None:
            opened = _opened_path(fd)
            if opened is None:
                raise ImageLoadError(
                    ref, "refused: this OS cannot tell which file was opened, so image_root cannot hold"
                )
            if not os.path.isabs(opened) or os.path.commonpath([root, opened]) != root:  # pipe:[..], socket:[..]
                raise ImageLoadError(ref, f"refused: the path resolves outside image_root {root!r}")
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageLoadError(ref, f"{_kind(mode)}, not an image file{tried}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return _read_bounded(f, ref, max_bytes)
    except OSError as e:
        raise ImageLoadError(ref, f"cannot read{tried}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)


# --- remote references ----------------------------------------------------------------------------------------


class _Sockets:
    """The sockets a download's connections opened, so that the waiting caller can shut them down."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)
            closed = self._closed
        if closed:  # the caller gave up while this connection was being made
            self._shut(sock)

    def shut_all(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._open)
        for sock in socks:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:  # wakes a read blocked in another thread, which then ends (close() alone would not)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    """urllib's opener, with connections that record their sockets in ``sockets``."""

    class Connection(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class SecureConnection(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            sockets.add(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Connection, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(SecureConnection, req, context=self._context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
                raise urllib.error.HTTPError(newurl, code, "refused a redirect to a non-HTTP URL", headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # HTTP(S) only (no ftp:, file: or data: handlers, which a redirect could otherwise reach).
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        Handler(),
        SecureHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        Redirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def download(ref: Any, url: str, max_bytes: int, timeout: float) -> bytes:
    """The body at ``url``: at most ``max_bytes``, and all of it within ``timeout`` seconds.

    The download runs in a helper thread; when the time is up, the caller stops waiting, shuts down the
    connection's socket (which ends the helper's read, whether it waits for headers or body, so no thread or
    socket outlives the download) and fails the reference.
    """
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {}
    sockets = _Sockets()

    def fetch() -> None:
        try:
            with _opener(sockets).open(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise ImageLoadError(
                        ref,
                        f"refused: its {_mebibytes(int(length))} are over the max_image_bytes limit of "
                        f"{_mebibytes(max_bytes)}",
                    )
                result["data"] = _read_bounded(response, ref, max_bytes, deadline)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            result["error"] = e

    helper = threading.Thread(target=fetch, name="beamcap-download", daemon=True)
    helper.start()
    helper.join(max(0.0, deadline - time.monotonic()))
    late = f"cannot download: no complete answer within {timeout:g} s"
    if helper.is_alive():
        sockets.shut_all()
        raise ImageLoadError(ref, late)
    error = result.get("error")
    # The helper can beat the join to the deadline: a socket operation timing out (each is given the whole
    # ``timeout`` on the same clock), or the body's reader seeing the deadline pass. Whichever notices first, the
    # reason is the same. A timeout before the deadline is another failure (the kernel's own ETIMEDOUT on connect,
    # say) and keeps its own reason below.
    timed_out = isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)
    if timed_out and time.monotonic() >= deadline:
        raise ImageLoadError(ref, late) from error
    if isinstance(error, ImageLoadError):
        raise error
    if error is not None:
        raise ImageLoadError(ref, f"cannot download: {type(error).__name__}: {_short(error)}") from None
    return result["data"]


def read_filesystem(ref: Any, path: str, max_bytes: int) -> bytes:
    """The bytes of a file on a Beam filesystem (``gs://``, ``s3://``, ...), at most ``max_bytes``."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        # Read as stored: never decompressed on the way (a small .bz2 object can expand to gigabytes before the
        # byte limit could see it, since Beam decompresses whole chunks).
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return _read_bounded(f, ref, max_bytes)
    except ImageLoadError:
        raise
    except Exception as e:  # Beam filesystems raise many kinds of errors
        raise ImageLoadError(ref, f"cannot read {printable(path)}: {type(e).__name__}: {_short(e)}") from e


def resolve_path(ref: str, image_root: str | None = None, base_dir: str | None = None) -> str:
    """The path or URL that ``ref`` names.

    With ``image_root``, relative references resolve under it, and remote references are refused (whether the
    file opened is under the root is checked when it is opened). Otherwise relative local references resolve
    against ``base_dir`` when one is given (a local folder or any Beam filesystem path), and everything else is
    used as it is.
    """
    is_remote = has_scheme(ref)
    if image_root is not None:
        if is_remote:
            raise ImageLoadError(
                ref, f"refused: remote references are not allowed when image_root is set ({image_root!r})"
            )
        return os.path.join(image_root, ref)
    if base_dir and not is_remote and not os.path.isabs(ref):
        return base_dir.rstrip("/") + "/" + ref if has_scheme(base_dir) else os.path.join(base_dir, ref)
    return ref


def read_bytes(
    ref: Any,
    image_root: str | None = None,
    base_dir: str | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_SECS,
) -> bytes:
    """The encoded bytes behind an image reference, read within the bounds above."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        if len(ref) > max_bytes:
            raise ImageLoadError(ref, f"refused: larger than the max_image_bytes limit of {_mebibytes(max_bytes)}")
        return bytes(ref)
    if not isinstance(ref, str):
        raise ImageLoadError(ref, f"an image reference must be a path, URL or bytes, not {type(ref).__name__}")
    if not ref:
        raise ImageLoadError(ref, "the image reference is an empty string")
    path = resolve_path(ref, image_root, base_dir)
    if path[:8].lower().startswith(("http://", "https://")):  # schemes are case-insensitive (RFC 3986)
        return download(ref, path, max_bytes, download_timeout)
    if has_scheme(path):
        return read_filesystem(ref, path, max_bytes)
    root = None
    if image_root is not None:
        try:
            root = os.path.realpath(image_root)
        except (OSError, ValueError) as e:
            raise ImageLoadError(ref, f"cannot resolve image_root {image_root!r}: {e}") from None
    return read_local(ref, path, max_bytes, root)


# --- decoding -------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as transformers' processors do)
    and 16/32-bit greyscale scaled down rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM"):
        # 16-bit greyscale (Pillow opens a PGM of more than 8 bits as "I", scaled to 0-65535): full scale is 65535,
        # whatever the values in this image
        values = np.asarray(image).astype(np.uint32)
        values *= 255
        values //= 65535
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "I":  # 32-bit greyscale, range unknown: read as 8-bit when it fits, else as 16-bit
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32, copy=False)
        if values.max(initial=0) > 255:
            values *= 255
            values //= 65535
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # floats: 0-1 by convention (float TIFFs), 0-255 when larger values show otherwise
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if values.max(initial=0.0) <= 1.0:
            values *= 255.0
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@functools.cache
def _formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` that this Pillow decodes, in Pillow's own order of trying them."""
    Image.init()
    return tuple(f for f in Image.ID if f in IMAGE_FORMATS)


def _refused_format(data: bytes) -> str | None:
    """The name of the Pillow format ``data`` starts like, when it is one beamcap does not decode."""
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in _formats() or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a format's check that cannot judge this prefix
            continue
    return None


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""A JPEG marker: 0xFF then neither stuffing (0x00), a restart (RSTn, inside scan data) nor another fill byte."""


def _jpeg_scans(data: bytes, limit: int) -> int:
    """How many scans (SOS markers) the first image of a JPEG holds, walking its marker segments (metadata is skipped
    by length; in entropy-coded data a 0xFF is always stuffed or a restart). Counting stops at the first EOI (the
    scans of an MPO's other frames, or of anything appended, are not decoded with the first) or past ``limit``;
    -1 past :data:`MAX_JPEG_HEADER_STEPS` markers."""
    scans, at, markers = 0, 2, 0
    while (found := _JPEG_MARKER.search(data, at)) is not None and markers <= MAX_JPEG_HEADER_STEPS:
        markers += 1
        start, marker = found.start(), data[found.start() + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, 0xD8):  # TEM, SOI: no length
            at = start + 2
            continue
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                break
        at = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    return scans if markers <= MAX_JPEG_HEADER_STEPS else -1


@functools.cache
def _jpeg_markers() -> tuple[frozenset[int], frozenset[int]]:
    """(markers Pillow reads a segment after, markers it reads alone), from its own table."""
    from PIL.JpegImagePlugin import MARKER

    with_segment = frozenset(m & 0xFF for m, (_, _, handler) in MARKER.items() if handler is not None)
    return with_segment, frozenset(m & 0xFF for m in MARKER) - with_segment


def _jpeg_header(data: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """Walk a JPEG's header as Pillow's ``_open`` does (junk and fill bytes skipped, markers without a segment
    passed, an EOI too, up to the first SOS or a marker it does not know), stopping past
    :data:`MAX_JPEG_HEADER_STEPS`: the TIFF structures Pillow holds after opening it (the EXIF of all its ``Exif``
    APP1 segments joined, the MPF of its last ``MPF`` APP2 segment), and the steps it took."""
    with_segment, alone = _jpeg_markers()
    exif, exif_bytes, mpf, at, steps = [], 0, None, 2, 0
    while steps <= MAX_JPEG_HEADER_STEPS and at + 1 < len(data):
        found = data.find(b"\xff", at)
        if found == -1:
            steps += len(data) - at
            break
        steps += found - at + 1  # junk, then this marker or fill byte
        at, marker = found, data[found + 1]
        if marker == 0xFF:  # fill
            at += 1
        elif marker == 0x00 or marker in alone:
            at += 2
        elif marker in with_segment:
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            payload = data[at + 4 : at + 4 + max(0, length - 2)]
            at += 4 + max(0, length - 2)
            if marker == 0xDA:  # Pillow's header ends at the first scan
                break
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header: a tuple per component
                steps += len(payload) // 3
            elif marker == 0xE1 and payload.startswith(b"Exif\0\0"):
                exif.append(payload[6:])
                exif_bytes += len(payload)
                steps += exif_bytes >> 10 if len(exif) > 1 else 0  # the joined block, copied again
            elif marker == 0xE2 and payload.startswith(b"MPF\0"):
                mpf = payload[4:]
        else:  # Pillow stops: "no marker found"
            break
    blocks = ([("EXIF", b"".join(exif))] if exif else []) + ([("MPF", mpf)] if mpf is not None else [])
    return blocks, steps


_GIF_BLOCK = re.compile(rb"[\x21\x2c\x3b]")  # an extension, a picture, the trailer


def _gif_preamble(data: bytes) -> tuple[int, int]:
    """(comment bytes, blocks) before a GIF's first picture, read as Pillow reads them on opening it: blocks are
    extensions, their sub-blocks and bytes of junk (Pillow reads each in Python). Counting stops past
    :data:`MAX_GIF_BLOCKS`."""
    if not data.startswith(b"GIF") or len(data) < 13:
        return 0, 0
    flags, at = data[10], 13
    if flags & 0x80:
        at += 3 << ((flags & 7) + 1)  # the global colour table
    comments = blocks = 0

    def sub_block() -> bytes:  # Pillow's GifImageFile.data(): b"" for the terminator (or the end)
        nonlocal at, blocks
        size = data[at] if at < len(data) else 0
        block, at = data[at + 1 : at + 1 + size], at + 1 + size
        blocks += 1
        return block

    while at < len(data) and blocks <= MAX_GIF_BLOCKS:
        found = _GIF_BLOCK.search(data, at)
        if found is None:
            blocks += len(data) - at  # junk to the end, a byte at a time
            break
        blocks += found.start() - at  # junk, skipped a byte at a time
        if data[found.start()] != 0x21:
            break
        label, at = data[found.start() + 1 : found.start() + 2], found.start() + 2
        block = sub_block()
        if label == b"\xfe":  # a comment: its sub-blocks up to the terminator, joined
            while block and blocks <= MAX_GIF_BLOCKS:
                comments += len(block)
                block = sub_block()
            comments += 1  # the newline Pillow puts between comments
            continue
        if label == b"\xff" and block.startswith(b"NETSCAPE2.0"):
            sub_block()  # the loop count
        while sub_block() and blocks <= MAX_GIF_BLOCKS:  # the rest, to a terminator (after an empty first too)
            pass
    return comments, blocks


_PNM_MAGIC = re.compile(rb"[^ \t\n\v\f\r]{0,6}")
_PNM_BLANKS = re.compile(rb"(?:[ \t\n\v\f\r]|#[^\r\n]*)*")
_PNM_TOKEN = re.compile(rb"(?:[^ \t\n\v\f\r#]|#[^\r\n]*[\r\n]?)*")  # a comment inside a token is dropped
_PNM_COMMENT = re.compile(rb"#[^\r\n]*[\r\n]?")


def _pnm_header(data: bytes) -> tuple[int, bytes, list[bytes]]:
    """(length, magic, tokens) of a PNM file's header as Pillow reads it, a byte at a time: its magic, size and
    maximum value (or scale). Only the first :data:`MAX_PNM_HEADER_BYTES` + 1 bytes are looked at: a length past
    that means the header is longer."""
    head = data[: MAX_PNM_HEADER_BYTES + 1]
    magic = _PNM_MAGIC.match(head).group()
    at, tokens = len(magic), []
    for _ in range(2 if magic in (b"P1", b"P4") else 3):
        start = _PNM_BLANKS.match(head, at).end()
        at = _PNM_TOKEN.match(head, start).end()
        tokens.append(_PNM_COMMENT.sub(b"", head[start:at]))
    return at, magic, tokens


def _pnm_decoded_in_python(magic: bytes, tokens: list[bytes]) -> bool:
    """Whether Pillow decodes this PNM file's pixels in Python: plain files, and binary ones whose maximum value
    is not 255 (nor 65535 for PGM)."""
    if magic in (b"P1", b"P2", b"P3"):
        return True
    if magic not in (b"P5", b"P6") or len(tokens) < 3 or not tokens[2].isdigit():
        return False
    maxval = int(tokens[2])
    return maxval != 255 and not (maxval == 65535 and magic == b"P5")


_TIFF_TYPE_BYTES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_LINKED_IFDS = (0x8769, 0x8825, 0xA005)  # Exif, GPS, Interoperability: IFDs a reader follows from the first
_MAX_IFDS = 64
MAX_TIFF_TAGS = 100_000
"""A TIFF or EXIF block with more tags than this (over its IFDs) is refused unread: honest ones hold tens to
hundreds, and walking millions (overlapping IFDs of a 256 MB file) would take minutes."""
MAX_PNG_CHUNKS = 65_536
"""A PNG with more chunks than this besides its picture data (IDAT, fdAT) is refused unread: Pillow keeps an entry for
each unknown one, and 21 million empty chunks in 252 MB took 56 s and 2.8 GB to open; honest files hold a few
(an animated PNG two a frame)."""
MAX_PNG_INFLATED_CHUNKS = 64
"""A PNG with more compressed text and profile chunks (zTXt, iTXt, iCCP) than this is refused unread: Pillow
inflates each, up to 1 MiB from 1 KB, and its 64 MiB budget for text misses some (an empty keyword, text that is
not UTF-8) and all profiles; 30,000 profiles took 70 s. 64 is that budget over 1 MiB; honest files hold a few."""
MAX_PNG_ALL_CHUNKS = 1_000_000
"""A PNG with more chunks than this in all is refused unread: even empty picture-data chunks are read one by one
(a 256 MB file cut into 1 KB chunks holds a quarter of a million)."""
MAX_TIFF_VALUES = 2_000_000
"""A TIFF or EXIF block whose tags list more numbers than this in all is refused unread: Pillow makes a Python
object of each (and a decoding step of each strip or tile offset), some 300 bytes apiece, so 33 million strip
offsets in a 264 MB file took over 8 GB. Honest files list at most a few hundred thousand (one strip per row of
the tallest picture the pixel limit allows, or its smallest tiles)."""


def tiff_tags(data: bytes) -> tuple[int, dict[int, int], int, int]:
    """For a TIFF structure (a TIFF file, or the EXIF block of another format): the bytes its tags' values take,
    summed over its first IFD and the IFDs linked from it (Exif, GPS, Interoperability), counting a repeated or
    shared value each time a reader copies it; the largest value given for each of TileWidth and TileLength
    (Pillow keeps a repeated tag's last value, libtiff its first); how many tags were walked (the walk stops
    past :data:`MAX_TIFF_TAGS`); and how many numbers their values list in all (bytes and text not counted: they
    stay one object). ``(0, {}, 0, 0)`` where ``data`` is not TIFF."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        return 0, {}, 0, 0
    (magic,) = struct.unpack_from(order + "H", data, 2)
    if magic == 42:
        count_format, entry, inline, first = "H", "HHL", 4, struct.unpack_from(order + "L", data, 4)[0]
    elif magic == 43 and len(data) >= 16:  # BigTIFF
        count_format, entry, inline, first = "Q", "HHQ", 8, struct.unpack_from(order + "Q", data, 8)[0]
    else:
        return 0, {}, 0, 0
    entry_bytes = struct.calcsize(order + entry) + inline
    total, largest, pending, seen, tags, numbers = 0, {}, [first], set(), 0, 0
    while pending and len(seen) < _MAX_IFDS and tags <= MAX_TIFF_TAGS:
        at = pending.pop()
        if at in seen or not 0 < at <= len(data) - struct.calcsize(order + count_format):
            continue
        seen.add(at)
        (entries,) = struct.unpack_from(order + count_format, data, at)
        at += struct.calcsize(order + count_format)
        for _ in range(min(entries, (len(data) - at) // entry_bytes, MAX_TIFF_TAGS + 1 - tags)):
            tags += 1
            tag, kind, count = struct.unpack_from(order + entry, data, at)
            value_at = at + entry_bytes - inline
            at += entry_bytes
            size = _TIFF_TYPE_BYTES.get(kind, 1) * count
            if kind not in (1, 2, 6, 7):  # BYTE, ASCII, SBYTE, UNDEFINED: one bytes or str object
                numbers += count
            if size > inline:
                total += size
            elif kind in (3, 4, 13, 16) and count >= 1:
                value_format = {3: "H", 4: "L", 13: "L", 16: "Q"}[kind]
                (value,) = struct.unpack_from(order + value_format, data, value_at)
                if tag in (322, 323):  # TileWidth, TileLength
                    largest[tag] = max(largest.get(tag, 0), value)
                elif tag in _LINKED_IFDS:
                    pending.append(value)
    return total, largest, tags, numbers


def _too_much_tag_data(walk: tuple[int, dict[int, int], int, int], size: int, what: str) -> str | None:
    """Why a TIFF structure (a file, or an EXIF block) of ``size`` bytes, walked by :func:`tiff_tags`, would take
    far more memory to read than its size, or None."""
    declared, _, tags, numbers = walk
    if tags > MAX_TIFF_TAGS:
        return f"its {what} holds more than {MAX_TIFF_TAGS} tags"
    if declared > size + TAG_DATA_SLACK:
        return f"its {what} declares {declared} bytes of tag values in {size} bytes (values shared many times)"
    if numbers > MAX_TIFF_VALUES:
        return f"its {what} tags list {numbers} numbers, over {MAX_TIFF_VALUES} (each read into an object of its own)"
    return None


def _png_chunks(data: bytes) -> tuple[int, int, int, int]:
    """How many chunks a PNG holds in all, besides its picture data (IDAT, and an animation's fdAT), how many
    compressed ones Pillow inflates (zTXt, iTXt, iCCP: up to 1 MiB each from 1 KB), and how many ICC profiles; the
    walk stops past :data:`MAX_PNG_ALL_CHUNKS` or at IEND."""
    at, chunks, other, inflated, profiles = 8, 0, 0, 0, 0
    while at + 8 <= len(data) and chunks <= MAX_PNG_ALL_CHUNKS and other <= MAX_PNG_CHUNKS:
        length, kind = struct.unpack_from(">I4s", data, at)
        at += 12 + length
        chunks += 1
        if kind not in (b"IDAT", b"fdAT"):
            other += 1
            inflated += kind in (b"zTXt", b"iTXt", b"iCCP")
            profiles += kind == b"iCCP"
        if kind == b"IEND":
            break
    return chunks, other, inflated, profiles


def _too_costly_to_open(data: bytes) -> str | None:
    """Why opening ``data`` (reading its header, before its size is known) would cost far more than its size says,
    or None. Format by format, from the bytes alone, walked as Pillow walks them."""
    if data.startswith(b"\xff\xd8"):
        blocks, steps = _jpeg_header(data)
        if steps > MAX_JPEG_HEADER_STEPS:
            return f"the JPEG header takes more than {MAX_JPEG_HEADER_STEPS} steps to read (markers, junk, frame data)"
        for what, block in blocks:
            too_much = _too_much_tag_data(tiff_tags(block), len(block), what)
            if too_much:
                return too_much
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        chunks, other, inflated, profiles = _png_chunks(data)
        if chunks > MAX_PNG_ALL_CHUNKS:
            return f"the PNG holds more than {MAX_PNG_ALL_CHUNKS} chunks"
        if other > MAX_PNG_CHUNKS:
            return f"the PNG holds more than {MAX_PNG_CHUNKS} chunks besides its picture data"
        if profiles > 1:
            return f"the PNG holds {profiles} ICC profiles (iCCP chunks; one at most is allowed, each is inflated)"
        if inflated > MAX_PNG_INFLATED_CHUNKS:
            return (
                f"the PNG holds {inflated} compressed text chunks (zTXt, iTXt), over {MAX_PNG_INFLATED_CHUNKS} "
                "(each is inflated, up to 1 MiB)"
            )
    elif data.startswith(b"GIF"):
        comments, blocks = _gif_preamble(data)
        if comments > MAX_GIF_COMMENT_BYTES:
            return f"the GIF holds more than {MAX_GIF_COMMENT_BYTES} bytes of comments before its first picture"
        if blocks > MAX_GIF_BLOCKS:
            return f"the GIF holds more than {MAX_GIF_BLOCKS} blocks (extensions, sub-blocks) before its first picture"
    elif len(data) >= 2 and data[:1] == b"P" and data[1] in b"0123456fy":  # Pillow's PNM family
        header, magic, tokens = _pnm_header(data)
        if header > MAX_PNM_HEADER_BYTES:
            return f"its PNM header is over {MAX_PNM_HEADER_BYTES} bytes long (read a byte at a time)"
        if _pnm_decoded_in_python(magic, tokens) and len(data) > MAX_SLOW_PNM_BYTES:
            return (
                f"the file is PNM that Pillow decodes in Python (plain, or of maximum value {tokens[-1][:8]!r}), "
                f"of {len(data)} bytes, over {MAX_SLOW_PNM_BYTES}"
            )
        if magic in (b"P1", b"P2", b"P3"):
            comments = itertools.islice(_PNM_COMMENT.finditer(data, header), MAX_PLAIN_PNM_COMMENTS + 1)
            if sum(1 for _ in comments) > MAX_PLAIN_PNM_COMMENTS:
                return f"the plain PNM file holds more than {MAX_PLAIN_PNM_COMMENTS} comments"
    return None


def _too_costly(image: Image.Image, data: bytes, max_pixels: int, tile_tags: dict[int, int]) -> str | None:
    """Why decoding this opened image would cost far more than its size says (time or memory), or None.
    ``tile_tags``: the largest TileWidth and TileLength the file gives (from :func:`tiff_tags`)."""
    if image.format in ("JPEG", "MPO"):
        scans = _jpeg_scans(data, MAX_JPEG_SCANS)
        if scans < 0:
            return f"the JPEG has more than {MAX_JPEG_HEADER_STEPS} markers in its first picture"
        if scans > MAX_JPEG_SCANS:
            return f"the JPEG has more than {MAX_JPEG_SCANS} scans (each is decoded over the whole picture)"
    elif image.format == "TIFF":
        tile_width, tile_height = tile_tags.get(322), tile_tags.get(323)
        if tile_width and tile_height:
            tile, own = tile_width * tile_height, image.size[0] * image.size[1]
            if tile > max_pixels or tile > max(MAX_TILE_OVERHANG * own, TILE_FLOOR):
                return (
                    f"its TIFF tiles of {tile_width}x{tile_height} pixels are far larger than its"
                    f" {image.size[0]}x{image.size[1]} picture (a whole tile is inflated to decode it)"
                )
    return None


def _exif_block(image: Image.Image) -> bytes | None:
    """The EXIF block that ``ImageOps.exif_transpose`` will read: ``info['exif']``, or, in a PNG, the hex text of a
    'Raw profile type exif' text chunk (ImageMagick's way), decoded as Pillow decodes it."""
    exif = image.info.get("exif")
    if isinstance(exif, bytes):
        return exif
    raw = image.info.get("Raw profile type exif")
    if isinstance(raw, str):
        try:
            return bytes.fromhex("".join(raw.split("\n")[3:]))
        except ValueError:
            return None  # Pillow's own reading fails the same way, and that error is caught below
    return None


def decode_image(
    data: bytes,
    ref: Any,
    max_pixels: int,
    draft_size: int | None = None,
    max_aspect_ratio: int = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode encoded bytes into an RGB image: its first frame, EXIF orientation applied.

    With ``draft_size``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that keeps both sides at least ``draft_size`` pixels: much faster when
    the model's processor downsizes the image anyway. Images declaring more
    than ``max_pixels`` pixels are refused before their pixels are decoded, so
    a decompression bomb cannot exhaust memory. Pillow's process-wide
    ``Image.MAX_IMAGE_PIXELS`` also applies: the effective limit is the smaller
    of the two. Only the first frame is read: the other frames of an animation
    or a multi-page file are never touched. A JPEG of more than
    :data:`MAX_JPEG_SCANS` scans, a TIFF whose tiles dwarf the picture
    (:data:`MAX_TILE_OVERHANG`), a TIFF, EXIF or MPF block whose tags declare
    more bytes than it holds (:data:`TAG_DATA_SLACK`) or more numbers than
    :data:`MAX_TIFF_VALUES`, and the JPEG, GIF, PNG and PNM headers that
    :func:`_too_costly_to_open` finds Pillow would spend minutes or gigabytes
    on are refused before decoding too: their cost is not bounded
    by their size. So is an image more than
    ``max_aspect_ratio`` times longer than wide (or wider than long).

    Any error from the decoder (corrupt files raise many kinds) becomes an
    :class:`ImageLoadError`.
    """
    if not data:
        raise ImageLoadError(ref, "the file is empty (0 bytes)")
    try:
        # Header only: the size is known before any pixel is decoded. (No warnings.catch_warnings here:
        # it changes process-wide state and DoFn threads decode concurrently.)
        # Pillow reads a TIFF's tags (and later any image's EXIF tags) whole, each value into its own copy
        walk = tiff_tags(data)
        too_much = _too_much_tag_data(walk, len(data), "TIFF header") or _too_costly_to_open(data)
        if too_much:
            raise ImageLoadError(ref, f"refused: {too_much}")
        image = Image.open(io.BytesIO(data), formats=_formats())
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                ref, f"refused: {width}x{height} pixels is over the max_image_pixels limit of {max_pixels}"
            )
        if max(width, height) > max_aspect_ratio * max(1, min(width, height)):
            raise ImageLoadError(
                ref,
                f"refused: {width}x{height} pixels is an aspect ratio over the max_aspect_ratio limit of "
                f"{max_aspect_ratio:g}:1 (processors that scale the short side up would blow it up to billions of "
                "pixels)",
            )
        costly = _too_costly(image, data, max_pixels, walk[1])
        if costly:
            raise ImageLoadError(ref, f"refused: {costly}")
        if draft_size and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        exif = _exif_block(image)
        if isinstance(exif, bytes) and not data.startswith(b"\xff\xd8"):  # a JPEG's was checked before opening
            exif = exif.removeprefix(b"Exif\x00\x00")
            too_much = _too_much_tag_data(tiff_tags(exif), len(exif), "EXIF")
            if too_much:
                raise ImageLoadError(ref, f"refused: {too_much}")
        ImageOps.exif_transpose(image, in_place=True)  # in place: a copy would lose the format to_rgb reads
        return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(ref, f"refused as a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        refused = _refused_format(data)
        if refused:
            raise ImageLoadError(
                ref, f"refused: the file is {refused}, a format beamcap does not decode (only {', '.join(_formats())})"
            ) from None
        raise ImageLoadError(ref, f"not a recognised image format ({len(data)} bytes)") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageLoadError(ref, f"corrupt or truncated image: {_short(e)}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file raises anything (IndexError, struct.error, ...)
        raise ImageLoadError(ref, f"corrupt or unsupported image: {type(e).__name__}: {_short(e)}") from None


def fit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """``image`` downscaled (aspect kept) to at most ``max_pixels`` pixels; unchanged when it fits."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def load_image(
    ref: Any,
    *,
    image_root: str | None = None,
    base_dir: str | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT_SECS,
    draft_size: int | None = None,
    max_aspect_ratio: int = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Read and decode one image reference into an RGB :class:`PIL.Image.Image`; any failure is an
    :class:`ImageLoadError`."""
    data = read_bytes(ref, image_root, base_dir, max_bytes, download_timeout)
    return decode_image(data, ref, max_pixels, draft_size, max_aspect_ratio)
