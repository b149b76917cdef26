"""Where a model comes from: a hub id, a local folder, a folder on a Beam filesystem, or a named bundled model.

Named models (``'beamcap-demo'``) are a registry: a name and the function
that gives its folder. Nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

from beamcap.paths import has_scheme

_LOGGER = logging.getLogger(__name__)

DEMO_MODEL_ALIAS = "beamcap-demo"


def _demo_model_path() -> str:
    from beamcap.demo import demo_model_path

    return demo_model_path()


NAMED_MODELS: dict[str, Callable[[], str]] = {DEMO_MODEL_ALIAS: _demo_model_path}
"""Model names beamcap knows, each with the function that gives its local folder."""


def resolve_model_path(hf_img2seq: str) -> str:
    """A folder or hub id ``from_pretrained`` can load.

    A name in :data:`NAMED_MODELS` gives its folder; a Beam filesystem path (``gs://``, ``s3://``, ...) is
    copied once to a local cache; anything else is passed on as it is.
    """
    if hf_img2seq in NAMED_MODELS:
        return NAMED_MODELS[hf_img2seq]()
    if has_scheme(hf_img2seq):
        return localize_model_folder(hf_img2seq)
    return hf_img2seq


def model_cache_dir() -> str:
    return os.environ.get("BEAMCAP_MODEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beamcap", "models"))


def localize_model_folder(path: str) -> str:
    """Copy the files of a model folder on any Beam filesystem to a local cache, once.

    The copy goes to a temporary folder renamed into place, so concurrent
    workers never load a half-copied model. Only the folder's own files are
    copied (``save_pretrained`` writes no subfolders).
    """
    from apache_beam.io.filesystems import FileSystems

    target = os.path.join(model_cache_dir(), hashlib.sha256(path.encode()).hexdigest()[:20])
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    folder = path.rstrip("/")
    files = [m.path for m in FileSystems.match([folder + "/*"])[0].metadata_list]
    if not any(f.endswith("/config.json") for f in files):
        raise FileNotFoundError(f"{path} holds no config.json: is it a folder written by save_pretrained?")
    os.makedirs(model_cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(dir=model_cache_dir(), prefix=".partial-")
    _LOGGER.info("Copying %d model files from %s to %s.", len(files), path, target)
    for source in files:
        with FileSystems.open(source) as src, open(os.path.join(staging, source.rsplit("/", 1)[-1]), "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
