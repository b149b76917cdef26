"""``beamcap-caption``: the job's command line (logs kept quiet, user errors as one line).

Beam logs a warning while it is imported (a missing optional Google Cloud library), and the loaders draw progress
bars: this entry point sets the logging up before anything is imported, so that a run prints beamcap's own progress
and warnings, its summary and its errors, and the rest only with --verbose.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

PROG = "beamcap-caption"


def _logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.ERROR, force=True)
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    _logging(verbose)
    from pipelines.caption import run, sample_failure  # Beam is imported here, with the logging set up
    from pipelines.options import UserError

    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("beamcap", "pipelines"):
            logging.getLogger(name).setLevel(logging.INFO)  # progress lines
        # Beam logs a failed bundle's traceback before it re-raises the error, which is shown here once.
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    try:
        run(argv)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        reason = sample_failure(e)
        if reason is None or verbose:
            raise
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
