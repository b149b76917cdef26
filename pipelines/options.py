"""The job's command line: a flag for every CaptionImages parameter (made from the declarations in
``beamcap.config``), and the check that every other argument is a real Beam pipeline option."""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from beamcap.config import CaptionConfig, Parameter, parameters


class UserError(Exception):
    """A mistake the user can fix (an argument, an input, a recipe, the model or the device): the job prints it as
    one line, ``beamcap-caption: error: <what> (<what to do>)``, and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UserError` (one line, no usage dump) and no abbreviations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(
        prog=prog,
        description=description,
        usage=f"{prog} --input 'data/*.jsonl' --output out/captioned [options] [Beam pipeline options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return list(dict.fromkeys(found))


def beam_option_parser() -> argparse.ArgumentParser:
    """A parser of every Beam pipeline option, made the way Beam makes its own.

    Beam offers no public parser of its options: each ``PipelineOptions`` subclass declares its flags in
    ``_add_argparse_args`` (the documented way to define options), and Beam collects them from the subclasses.
    This does the same; tests/test_cli.py fails if Beam changes how options are declared.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = _Parser(prog="beamcap-caption", add_help=False, conflict_handler="resolve")  # a flag declared twice
    parser.add_value_provider_argument = parser.add_argument  # what Beam's parser adds to argparse's
    for cls in _subclasses(PipelineOptions):
        cls._add_argparse_args(parser)
    return parser


def _suggestion(token: str, choices: list[str]) -> str:
    flag = token.split("=", 1)[0]
    underscored = "--" + flag.lstrip("-").replace("-", "_")
    if underscored in choices:
        return f"; did you mean {underscored}?"
    close = difflib.get_close_matches(flag, choices, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def check_beam_arguments(parser: argparse.ArgumentParser, leftovers: list[str]) -> None:
    """Refuse, before any work, what is neither one of the job's flags nor a Beam pipeline option."""
    beam = beam_option_parser()
    _, unknown = beam.parse_known_args(leftovers)
    if not unknown:
        return
    token = unknown[0]
    if not token.startswith("-"):
        raise UserError(
            f"unexpected argument {token!r} (quote globs so the shell does not expand them: --input 'data/*.jsonl'; "
            "several inputs go after one --input)"
        )
    choices = [o for p in (parser, beam) for a in p._actions for o in a.option_strings if o.startswith("--")]
    raise UserError(
        f"unrecognized argument {token.split('=', 1)[0]}{_suggestion(token, choices)} "
        "(it is neither a beamcap-caption flag nor a Beam pipeline option)"
    )


def parse_bool(text: str) -> bool:
    """true/false (also 1/0, yes/no), as every boolean flag takes."""
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
        group.add_argument(f"--{p.name}", default=default, help=_help(p, default), **_flag(p))


def _help(p: Parameter, default: Any) -> str:
    """One line of help: what the flag does, its valid values, and its default (what a None default resolves to)."""
    if p.resolves:
        shown = p.resolves
    elif isinstance(default, bool):
        shown = str(default).lower()
    elif default is None or default == {}:
        shown = "none"
    else:
        shown = str(default)
    choices = f" ({', '.join(p.choices)})" if p.choices else ""
    return f"{p.help}{choices} (default: {shown})".replace("%", "%%")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> CaptionConfig:
    values = {p.name: getattr(args, p.name) for p in parameters()}
    values.update(overrides)
    return CaptionConfig(**values)
