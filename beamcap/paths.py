"""Telling local paths from URLs and Beam filesystem paths."""

from __future__ import annotations

import re

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def has_scheme(path: str) -> bool:
    """Whether ``path`` names a URL or a Beam filesystem (``gs://``, ``s3://``, ``http://``, ...)."""
    return bool(_SCHEME_RE.match(path))
