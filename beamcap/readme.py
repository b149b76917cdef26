"""Write README.md's parameter table from the declarations in :mod:`beamcap.config`.

    python -m beamcap.readme README.md      # replace the table between the markers
    python -m beamcap.readme                # print it

tests/test_config.py fails when README.md's table differs from the declarations.
"""

from __future__ import annotations

import argparse

from beamcap.config import markdown_table

MARKERS = ("<!-- parameters: made by python -m beamcap.readme README.md -->", "<!-- /parameters -->")


def write_table(path: str) -> None:
    """Replace the parameter table between :data:`MARKERS` in ``path`` with :func:`markdown_table`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{text[:start]}\n{markdown_table()}\n{text[end:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readme", nargs="?", help="a README.md whose table (between its markers) is replaced")
    readme = parser.parse_args(argv).readme
    if readme:
        write_table(readme)
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
