"""Command-line flags for every CaptionImages parameter, made from the declarations in ``beamcap.config``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from beamcap.config import CaptionConfig, Parameter, describe, parameters


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_beams\": 3}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_beams\": 3}}', got {text!r}")
    return value


def _flag(p: Parameter) -> dict[str, Any]:
    """argparse keyword arguments for one parameter."""
    kind = p.value_type
    if kind is bool:
        return {"type": parse_bool, "metavar": "{true,false}"}
    if kind is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if p.choices:
        return {"choices": list(p.choices)}
    if kind in (int, float):
        return {"type": kind}
    return {}


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per CaptionImages parameter, with its default."""
    group = parser.add_argument_group("captioning (CaptionImages parameters)")
    for p in parameters():
        default = p.default.value if hasattr(p.default, "value") else p.default
        group.add_argument(
            f"--{p.name}", default=default, help=describe(p).replace("%", "%%") + " (default: %(default)s)", **_flag(p)
        )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> CaptionConfig:
    values = {p.name: getattr(args, p.name) for p in parameters()}
    values.update(overrides)
    return CaptionConfig(**values)
