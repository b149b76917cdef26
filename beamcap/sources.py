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
HUB_PROBE_SECS = 5.0


class ModelSourceError(ValueError):
    """A model that cannot be had from where ``hf_img2seq`` says: the message says what to do."""


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


def _looks_like_a_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder rather than a hub id ('org/name' or 'name')."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _fetch_hint(name: str) -> str:
    return (
        f"fetch it once on a connected machine (hf download {name} --local-dir DIR, or from_pretrained then "
        "save_pretrained) and pass the folder as hf_img2seq; with HF_HUB_OFFLINE=1 only the local Hugging Face "
        "cache is used"
    )


def check_model_source(hf_img2seq: str) -> None:
    """Fail fast, with what to do, when the model cannot be had: a folder that does not exist or was not written
    by ``save_pretrained``, or a hub id that is neither cached nor reachable (the hub client would otherwise retry
    for half a minute per file). Raises :class:`ModelSourceError`."""
    name = hf_img2seq
    if name in NAMED_MODELS:
        return
    if has_scheme(name):
        from apache_beam.io.filesystems import FileSystems

        try:
            found = FileSystems.match([name.rstrip("/") + "/config.json"])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - Beam filesystems raise many kinds of errors
            raise ModelSourceError(f"cannot list the model folder {name!r}: {e}") from None
        if not found:
            raise ModelSourceError(f"{name!r} holds no config.json: is it a folder written by save_pretrained?")
        return
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelSourceError(
                f"model folder {name!r} has no config.json: is it a folder written by save_pretrained?"
            )
        return
    if _looks_like_a_path(name) or os.path.exists(folder):
        raise ModelSourceError(f"model folder {name!r} does not exist (give a save_pretrained folder or a hub id)")
    _check_hub_model(name)


def _check_hub_model(repo_id: str) -> None:
    import socket
    import urllib.parse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # in the local cache
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            + _fetch_hint(repo_id)
        )
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECS).close()
    except OSError as e:
        raise ModelSourceError(
            f"model {repo_id!r} is neither a local folder nor in the local Hugging Face cache, and the hub ({host}) "
            f"cannot be reached from this machine ({e.strerror or e}): " + _fetch_hint(repo_id)
        ) from None


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
