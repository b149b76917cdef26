"""Reading a Data-Juicer recipe (YAML) into the job's settings.

Supported: ``dataset_path``, ``export_path``, ``text_keys``, ``image_key``,
``image_special_token``, ``eoc_special_token`` and one
``image_captioning_mapper`` entry of ``process`` with its arguments. Other
ops are an error that names them (``skip_other_ops`` lets a user run only the
captioning step). Data-Juicer's other per-op arguments (scheduling hints such
as ``num_proc``, data keys the op does not read) are accepted without effect,
each logged with the reason; any other unknown argument is an error.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from beamcap.config import REFERENCE_PARAMETERS, parameters
from pipelines.options import UserError

_LOGGER = logging.getLogger(__name__)

OP_NAME = "image_captioning_mapper"
# The operator's own parameters, and the data keys it reads.
MAPPER_ARGS = {p.name for p in parameters()[:REFERENCE_PARAMETERS]} | {"text_key", "image_key"}
# Data-Juicer's other per-op arguments: accepted, without effect under Beam, for the reason given.
IGNORED_ARGS = {
    **dict.fromkeys(
        ("accelerator", "num_proc", "mem_required", "cpu_required", "gpu_required", "turbo", "batch_size",
         "work_dir", "batch_mode", "runtime_np"),
        "Beam schedules the work",
    ),
    "skip_op_error": "failed samples go to --failed_output",
    **dict.fromkeys(
        ("audio_key", "video_key", "query_key", "response_key", "history_key", "index_key"),
        "the captioning op reads only text_key and image_key",
    ),
}  # fmt: skip


class RecipeError(UserError):
    """A recipe beamcap cannot run as it is."""


MAX_RECIPE_NODES = 100_000
"""The most values (mappings, lists and scalars) a recipe may hold with its YAML aliases expanded: a few lines of
nested aliases ("billion laughs") would otherwise expand to gigabytes. Real recipes hold some hundreds."""


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes ``node`` holds with aliases expanded (an alias counts its whole target each time), counted
    up to ``limit + 1`` at most."""
    count, stack = 0, [node]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.MappingNode):
            stack.extend(item for pair in node.value for item in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return count


def load_recipe(path: str, skip_other_ops: bool = False) -> dict[str, Any]:
    """The job settings a recipe asks for, as ``{flag name: value}``."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8")
        if _expanded_nodes(yaml.compose(text, Loader=yaml.SafeLoader), MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
            raise RecipeError(
                f"{path}: holds more than {MAX_RECIPE_NODES} values once its YAML aliases (*name) are expanded; "
                "write the values out, or use fewer aliases"
            )
        recipe = yaml.safe_load(text)
    except RecipeError:
        raise
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    except Exception as e:  # noqa: BLE001 - a missing file, a filesystem error
        raise RecipeError(f"cannot read the recipe {path}: {e}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    settings: dict[str, Any] = {}
    if recipe.get("dataset_path"):
        settings["input"] = str(recipe["dataset_path"])
    if recipe.get("export_path"):
        settings["output"] = str(recipe["export_path"])
    text_keys = recipe.get("text_keys")
    if isinstance(text_keys, list):
        if len(text_keys) != 1:
            raise RecipeError(f"{path}: text_keys {text_keys} has {len(text_keys)} keys; captioning uses one text key")
        text_keys = text_keys[0]
    if text_keys:
        settings["text_key"] = str(text_keys)
    for recipe_key, flag in (("image_key", "image_key"), ("image_special_token", "image_token"),
                             ("eoc_special_token", "eoc_token")):  # fmt: skip
        if recipe.get(recipe_key):
            settings[flag] = str(recipe[recipe_key])
    mappers, others = [], []
    process = recipe.get("process") or []
    if not isinstance(process, list):
        raise RecipeError(f"{path}: process must be a list of ops, got {type(process).__name__} {process!r:.100}")
    for entry in process:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{path}: each process entry must be a mapping of one op name to its arguments")
        ((name, args),) = entry.items()
        if not isinstance(name, str):
            raise RecipeError(f"{path}: an op name must be a string, got {type(name).__name__} {name!r:.100}")
        (mappers if name == OP_NAME else others).append((name, args or {}))
    if others and not skip_other_ops:
        names = ", ".join(sorted({n for n, _ in others}))
        raise RecipeError(
            f"{path}: beamcap runs only {OP_NAME}; the recipe also has: {names}. Run those ops in Data-Juicer, "
            "or pass --skip_other_ops to run only the captioning step."
        )
    if len(mappers) != 1:
        raise RecipeError(f"{path}: expected exactly one {OP_NAME} in process, found {len(mappers)}")
    args = mappers[0][1]
    if not isinstance(args, dict):
        raise RecipeError(f"{path}: {OP_NAME}'s arguments must be a mapping, got {type(args).__name__} {args!r:.100}")
    not_names = [k for k in args if not isinstance(k, str)]
    if not_names:
        raise RecipeError(f"{path}: {OP_NAME}'s argument names must be strings, got {not_names!r:.100}")
    unknown = sorted(set(args) - MAPPER_ARGS - IGNORED_ARGS.keys())
    if unknown:
        raise RecipeError(f"{path}: {OP_NAME} has arguments beamcap does not know: {unknown}")
    for name in sorted(IGNORED_ARGS.keys() & args.keys()):
        _LOGGER.info("%s: %s %s=%r has no effect here: %s.", path, OP_NAME, name, args[name], IGNORED_ARGS[name])
    settings.update({k: v for k, v in args.items() if k in MAPPER_ARGS})
    return settings
