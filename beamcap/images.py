"""Reading image references into RGB images.

A reference is raw ``bytes``, a local path, an ``http(s)://`` URL or any
path a Beam filesystem understands (``gs://``, ``s3://``, ...). Every failure
is raised as :class:`ImageLoadError`, whose message names the reference and
the cause in plain words.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from beamcap.paths import has_scheme

_HTTP_TIMEOUT_SECS = 10.0
# Pillow's own decompression-bomb threshold (its default when a caller has set it to None).
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 178_956_970


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


def resolve_path(ref: str, image_root: str | None = None, base_dir: str | None = None) -> str:
    """The path or URL that ``ref`` names.

    With ``image_root``, relative references resolve under it, and anything
    that lands outside it (``..``, an absolute path elsewhere, a symlink
    pointing out, a URL) is refused. Otherwise relative local references
    resolve against ``base_dir`` when one is given (a local folder or any
    Beam filesystem path), and everything else is used as it is.
    """
    is_remote = has_scheme(ref)
    if image_root is not None:
        if is_remote:
            raise ImageLoadError(
                ref, f"refused: remote references are not allowed when image_root is set ({image_root!r})"
            )
        root = os.path.realpath(image_root)
        path = os.path.realpath(os.path.join(root, ref))
        if os.path.commonpath([root, path]) != root:
            raise ImageLoadError(ref, f"refused: the path resolves outside image_root {image_root!r}")
        return path
    if base_dir and not is_remote and not os.path.isabs(ref):
        return base_dir.rstrip("/") + "/" + ref if has_scheme(base_dir) else os.path.join(base_dir, ref)
    return ref


def read_bytes(
    ref: Any, image_root: str | None = None, base_dir: str | None = None, http_timeout: float = _HTTP_TIMEOUT_SECS
) -> bytes:
    """The encoded bytes behind an image reference."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise ImageLoadError(ref, f"an image reference must be a path, URL or bytes, not {type(ref).__name__}")
    if not ref:
        raise ImageLoadError(ref, "the image reference is an empty string")
    path = resolve_path(ref, image_root, base_dir)
    if path.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(path, timeout=http_timeout) as response:  # noqa: S310 (scheme checked)
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageLoadError(ref, f"cannot download: {e}") from e
    if has_scheme(path):
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as f:
                return f.read()
        except Exception as e:  # Beam filesystems raise many kinds of errors
            raise ImageLoadError(ref, f"cannot read: {e}") from e
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageLoadError(ref, "file not found") from None
    except PermissionError:
        raise ImageLoadError(ref, "permission denied") from None
    except IsADirectoryError:
        raise ImageLoadError(ref, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageLoadError(ref, f"cannot read: {e.strerror or e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as transformers' processors do)
    and 16/32-bit greyscale scaled down rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16/32-bit greyscale
        values = np.asarray(image, dtype=np.float64)
        top = 255.0 if values.max(initial=0) <= 255 else 65535.0
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        return image.convert("L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, ref: Any, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode encoded bytes into an RGB image: first frame, EXIF orientation applied.

    With ``draft_size``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that keeps both sides at least ``draft_size`` pixels: much faster when
    the model's processor downsizes the image anyway. Images declaring more
    than ``max_pixels`` pixels are refused before their pixels are decoded, so
    a decompression bomb cannot exhaust memory. Pillow's
    own process-wide ``Image.MAX_IMAGE_PIXELS`` also applies: the effective
    limit is the smaller of the two.
    """
    if not data:
        raise ImageLoadError(ref, "the file is empty (0 bytes)")
    try:
        # Header only: the size is known before any pixel is decoded. (No warnings.catch_warnings here:
        # it changes process-wide state and DoFn threads decode concurrently.)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                ref, f"refused: {width}x{height} pixels is over the max_image_pixels limit of {max_pixels}"
            )
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        if draft_size and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(ref, f"refused as a possible decompression bomb: {e}") from e
    except UnidentifiedImageError:
        raise ImageLoadError(ref, f"not a recognised image format ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(ref, f"corrupt or truncated image: {e}") from e


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
    draft_size: int | None = None,
) -> Image.Image:
    """Read and decode one image reference into an RGB :class:`PIL.Image.Image`."""
    return decode_image(read_bytes(ref, image_root, base_dir), ref, max_pixels, draft_size)
