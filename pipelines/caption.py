"""The captioning job: Data-Juicer JSONL (or Parquet) in, captioned JSONL (or Parquet) out.

    beamcap-caption --input 'data/*.jsonl' --output out/captioned --hf_img2seq beamcap-demo \\
        --failed_output out/failed [Beam pipeline options]

Relative image paths resolve against the input's folder unless --image_base_dir
or --image_root says otherwise. Without --failed_output the job stops at the
first sample that cannot be captioned. Every local path is made absolute here,
on the launcher, so that workers in any folder read and write the same files.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import decimal
import glob
import io
import json
import logging
import math
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from beamcap.config import CaptionConfig, is_positive_int, parameters
from beamcap.images import printable
from beamcap.metrics import LOADS_IN, METRICS_NAMESPACE
from beamcap.paths import has_scheme
from beamcap.samples import MAX_SAMPLE_DEPTH, SampleError, nesting_depth
from beamcap.transform import CaptionImages
from pipelines.options import UserError, add_caption_arguments, check_beam_arguments, config_from_args, make_parser
from pipelines.preflight import check_device, check_inputs, check_model
from pipelines.recipe import load_recipe

_LOGGER = logging.getLogger(__name__)
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
"""The runner used when none is named: the in-process runner DirectRunner runs batch jobs on, named directly so
that Beam does not first try to download its Prism runner binary (which fails offline)."""


DEFAULT_MAX_LINE_BYTES = 64 << 20
"""The longest JSONL line read; a longer one goes to the failed output and is never held whole."""
BYTES_PER_VALUE = 2
"""A JSON line holds at most one value per this many bytes (``[0,0,...]``): a Parquet row is held to as many."""
_BLOCK = 1 << 20
SCHEMA_LINES = 200
"""Parquet output from JSONL input takes its schema from the samples on this many first lines..."""
SCHEMA_BYTES = 16 << 20
"""...or on as many first lines as this many bytes hold (at least one): the launcher holds them all parsed."""
_HEAD = 1000
"""How many bytes of an over-long line its failure record shows."""
# A JSON escape of a UTF-16 surrogate: the only way a lone surrogate reaches a parsed sample (UTF-8 cannot hold one).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class ParseRecord(beam.DoFn):
    """Numbered JSONL lines and Parquet rows (:func:`read_records`) to samples; a line that is not valid UTF-8,
    strict JSON or Unicode, is nested too deeply or is too long, and a row that could not be read, goes to
    ``failed`` with its file, line or row number and the reason (a line's bytes escaped where they are not UTF-8)."""

    FAILED = "failed"

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self._max_line_bytes = max_line_bytes
        self._lines_read = Metrics.counter(METRICS_NAMESPACE, "lines_read")
        self._lines_unparseable = Metrics.counter(METRICS_NAMESPACE, "lines_unparseable")

    def process(self, numbered: tuple[str, int, Any, int]):
        path, number, raw, length = numbered
        self._lines_read.inc()
        if length == READ:
            sample, problem = raw
        elif length == UNREADABLE:
            sample, problem = "", raw.decode("utf-8", "backslashreplace")
        elif length > self._max_line_bytes:
            sample = raw[:_HEAD].decode("utf-8", "backslashreplace") + "..."
            problem = f"the line is {length} bytes, over the --max_line_bytes limit of {self._max_line_bytes}"
        else:
            sample, problem = parse_json_line(raw)
        if problem is None:
            yield sample
            return
        self._lines_unparseable.inc()
        yield beam.pvalue.TaggedOutput(self.FAILED, {"sample": sample, "error": f"{path}:{number}: {problem}"})


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid in strict JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: Python would read inf, which strict JSON cannot write back
        raise ValueError(f"the number {text[:50]} is too large for a float")
    return value


def parse_json_line(raw: bytes) -> tuple[Any, str | None]:
    """(the sample, None), or (the line as text, what is wrong with it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", "backslashreplace"), f"not valid UTF-8 (byte {e.start}: {raw[e.start : e.end]!r})"
    try:
        sample = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        return text, "invalid JSON: nested too deeply to parse"
    except json.JSONDecodeError as e:
        return text, f"invalid JSON: {e.msg} (column {e.colno})"
    except ValueError as e:
        return text, f"invalid JSON: {e}"
    if nesting_depth(sample, MAX_SAMPLE_DEPTH) > MAX_SAMPLE_DEPTH:  # as the transform refuses it, but kept as text
        return text, f"nested more than {MAX_SAMPLE_DEPTH} levels deep (dicts and lists)"
    surrogate = _lone_surrogate(sample) if _SURROGATE_ESCAPE.search(text) else None  # walked only when it may hold one
    if surrogate is not None:
        return text, f"holds a lone surrogate ({surrogate!r}), which is not valid Unicode"
    return sample, None


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that cannot be encoded as UTF-8, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return item[e.start : e.end]
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def split_lines(read: Callable[[int], bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """(line, its length in bytes) for each line of a byte stream, without its ``\\n``; of a line longer than
    ``limit``, only the first ``limit + 1`` bytes are kept (memory stays bounded whatever the stream holds)."""
    head, length = bytearray(), 0
    while block := read(_BLOCK):
        start = 0
        while True:
            end = block.find(b"\n", start)
            piece = block[start:] if end < 0 else block[start:end]
            if length <= limit:
                head += piece[: limit + 1 - length]
            length += len(piece)
            if end < 0:
                break
            yield bytes(head), length
            head, length, start = bytearray(), 0, end + 1
    if length:
        yield bytes(head), length


UNREADABLE = -1
"""The length :func:`numbered_lines` gives where the file cannot be read on (its bytes are then the reason)."""
READ = -2
"""The length :func:`parquet_records` gives: the entry holds (the sample, None or what is wrong), not bytes."""


def numbered_lines(file: fileio.ReadableFile, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """(path, line number, line bytes, line length) for each non-blank line of a matched file (compressed files
    too); a line over ``max_line_bytes`` carries only its first bytes (ParseRecord fails it). A compressed file
    that is truncated or corrupt gives its lines up to there, then one entry of length ``UNREADABLE`` saying why
    (Beam's own reader would drop the rest silently, or stop the job)."""
    path, number = file.metadata.path, 0
    try:
        with open_bounded(file) as f:
            for number, (line, length) in enumerate(lines_within(f.read, max_line_bytes), 1):
                if length > max_line_bytes:
                    yield path, number, line[:_HEAD], length
                elif line.strip():
                    yield path, number, line, length
    except _decompression_errors() as e:
        yield path, number + 1, f"cannot read on: {type(e).__name__}: {e}".encode(), UNREADABLE


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    import zstandard

    return (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError, InflationError)


@contextlib.contextmanager
def open_bounded(file: fileio.ReadableFile):
    """The file's content, decompressed by its name's suffix, where every ``read(n)`` inflates at most ``n`` bytes.

    Beam's own reader inflates whole 16 MiB compressed blocks at once, so a small gzip or bzip2 bomb would need
    gigabytes; Python's gzip and bzip2 readers take the limit, :class:`_ZlibReader` does for ``.deflate``,
    :class:`_LzmaReader` for ``.xz`` and ``.lzma``, and :class:`_ZstdReader` nearly does for ``.zst``. zstd frames
    that need a window over zstd's default of 128 MiB are refused (Beam allows 2 GiB, memory a hostile file could
    claim), and so are xz and lzma streams that need more decoder memory than that. A file cut short raises, in
    every format.
    """
    import bz2
    import gzip

    readers = {
        CompressionTypes.GZIP: lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
        CompressionTypes.BZIP2: bz2.BZ2File,
        CompressionTypes.LZMA: _LzmaReader,
        CompressionTypes.ZSTD: _ZstdReader,
        CompressionTypes.DEFLATE: _ZlibReader,
    }
    reader = readers.get(CompressionTypes.detect_compression_type(file.metadata.path))
    if reader is not None and file.metadata.size_in_bytes == 0:  # empty, as Beam's reader takes it
        yield io.BytesIO(b"")
        return
    if reader is None:
        with file.open() as f:
            yield f
        return
    with file.open(compression_type=CompressionTypes.UNCOMPRESSED) as raw, reader(raw) as f:
        yield _Inflation(f, file.metadata.size_in_bytes)


MAX_INFLATION = 1000
"""A compressed input may inflate to this many times its size (or to :data:`INFLATION_FLOOR`) and no further:
JSONL compresses 5 to 200 times, and a few hundred bytes of bzip2 inflating to gigabytes of tiny lines would hold a
worker for hours."""
INFLATION_FLOOR = 1 << 20


class InflationError(ValueError):
    """A compressed input inflates past :data:`MAX_INFLATION` times its size."""


class _Inflation:
    """A decompressing reader that raises :class:`InflationError` past :data:`MAX_INFLATION` times ``size``."""

    def __init__(self, f, size: int):
        self._f, self._left, self._size = f, max(MAX_INFLATION * size, INFLATION_FLOOR), size

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._left -= len(data)
        if self._left < 0:
            raise InflationError(
                f"it inflates past {MAX_INFLATION} times its {self._size} compressed bytes (at least "
                f"{INFLATION_FLOOR >> 20} MiB are allowed): not read on"
            )
        return data


class _StreamReader(contextlib.AbstractContextManager):
    """A decompressing reader over a raw file that its caller opens and closes (so leaving it closes nothing)."""

    def __exit__(self, *exc) -> None:
        return None


class _ZlibReader(_StreamReader):
    """A ``.deflate`` file's content (zlib streams, one after another, as Beam writes and reads them): every
    ``read(n)`` inflates at most ``n`` bytes; a stream cut short raises EOFError."""

    def __init__(self, raw):
        import zlib

        self._raw, self._new = raw, zlib.decompressobj
        self._stream, self._fed = self._new(), False

    def read(self, size: int = -1) -> bytes:
        size = size if size and size > 0 else _BLOCK
        while True:
            if self._stream.eof:  # the next stream, if any, starts in what the last one left (at its end, zlib
                # leaves those bytes in unconsumed_tail too: fed again to the ended stream, they would loop forever)
                data = self._stream.unused_data or self._raw.read(_BLOCK)
                if not data:
                    return b""
                self._stream, self._fed = self._new(), False
            else:
                data = self._stream.unconsumed_tail or self._raw.read(_BLOCK)
                if not data:
                    if self._fed:
                        raise EOFError("the compressed file ended before the end-of-stream marker was reached")
                    return b""
            self._fed = True
            out = self._stream.decompress(data, size)
            if out:
                return out


MAX_DECODER_MEMORY = 128 << 20
"""The memory an xz or lzma stream may ask its decoder for: zstd's default window limit (a header can claim a
4 GiB dictionary, and Python's ``lzma.LZMAFile`` sets no limit)."""


XZ_MAGIC = b"\xfd7zXZ\x00"
MAX_XZ_STREAMS = 10_000
"""An .xz input of more streams than this is refused past them: each empty stream (32 bytes) costs a new decoder
and gives nothing for the inflation bound to count, so 256 MB of them would hold a worker for minutes. Parallel
compressors write one stream per block of megabytes."""


class _LzmaReader(_StreamReader):
    """An ``.xz`` or ``.lzma`` file's content (streams one after another, with xz's zero padding between them):
    every ``read(n)`` inflates at most ``n`` bytes; a stream needing more than :data:`MAX_DECODER_MEMORY`, one cut
    short, and bytes after the last that are not a stream raise (``lzma.LZMAFile`` ignores the last quietly)."""

    def __init__(self, raw):
        import lzma

        self._raw = raw
        self._new = lambda: lzma.LZMADecompressor(lzma.FORMAT_AUTO, memlimit=MAX_DECODER_MEMORY)
        self._stream, self._started, self._xz, self._streams = self._new(), False, False, 0

    def read(self, size: int = -1) -> bytes:
        import lzma

        size = size if size and size > 0 else _BLOCK
        while True:
            if not self._started:  # the first stream (a .lzma file's first byte may be 0: nothing is stripped)
                data = self._raw.read(_BLOCK)
                if not data:
                    return b""
                self._xz, self._started = data.startswith(XZ_MAGIC), True
                self._stream, self._streams = self._new(), 1
            elif self._stream.eof:  # what follows: xz's zero padding, then another xz stream by its magic bytes
                data = self._stream.unused_data or self._raw.read(_BLOCK)
                if self._xz:
                    data = data.lstrip(b"\0")
                    while not data and (more := self._raw.read(_BLOCK)):
                        data = more.lstrip(b"\0")
                if not data:
                    return b""
                while len(data) < len(XZ_MAGIC) and (more := self._raw.read(_BLOCK)):
                    data += more
                if not self._xz or not data.startswith(XZ_MAGIC):
                    if self._xz and XZ_MAGIC.startswith(data):
                        raise EOFError("the compressed file ended inside the header of its next stream")
                    kind = "xz" if self._xz else ".lzma"
                    raise lzma.LZMAError(f"bytes after the last {kind} stream are not a stream: {data[:16]!r}")
                self._streams += 1
                if self._streams > MAX_XZ_STREAMS:
                    raise lzma.LZMAError(f"the file holds more than {MAX_XZ_STREAMS} xz streams")
                self._stream = self._new()
            elif self._stream.needs_input:
                data = self._raw.read(_BLOCK)
                if not data:
                    raise EOFError("the compressed file ended before the end-of-stream marker was reached")
            else:
                data = b""
            out = self._stream.decompress(data, size)
            if out:
                return out


class _ZstdReader(_StreamReader):
    """A ``.zst`` file's content (frames, skippable ones too, one after another); a frame cut short raises EOFError
    (zstandard's stream reader ends quietly there, and the lines after the cut would be lost without a word).

    zstandard's decompressor takes no output limit, so input goes in :data:`FEED` bytes at a time: one step inflates
    at most what that many bytes can (8 MiB, zstd's largest ratio being about 32,000), kept for the reads after.
    """

    FEED = 256

    def __init__(self, raw):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._stream, self._fed = self._new(), False
        self._input, self._at = b"", 0
        self._out, self._out_at = memoryview(b""), 0

    def read(self, size: int = -1) -> bytes:
        size = size if size and size > 0 else _BLOCK
        while self._out_at == len(self._out):
            if self._stream.eof:  # a frame ended: the next starts in what was fed past its end
                self._at -= len(self._stream.unused_data)
                self._stream, self._fed = self._new(), False
            if self._at == len(self._input):
                self._input, self._at = self._raw.read(_BLOCK), 0
                if not self._input:
                    if self._fed:
                        raise EOFError("the compressed file ended inside a zstd frame")
                    return b""
            piece = self._input[self._at : self._at + self.FEED]
            self._at += len(piece)
            self._fed = True
            self._out, self._out_at = memoryview(self._stream.decompress(piece)), 0
        out = self._out[self._out_at : self._out_at + size].tobytes()
        self._out_at += len(out)
        return out


def lines_within(read: Callable[[int], bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """:func:`split_lines` with the ``\\r`` of CRLF line ends taken off, before the length is compared with
    ``limit`` (a line is as long as its content, whichever line end it has)."""
    for raw, length in split_lines(read, limit + 1):
        if length <= limit + 1:  # the whole line is here (a line of limit + 1 bytes is too long, unless one is \r)
            raw = raw.rstrip(b"\r")
            length = len(raw)
        yield raw, length


_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")
"""Characters that JSON leaves raw but Python's ``str.splitlines`` (and JavaScript before ES2019) ends a line at."""


def to_json_line(element: Any) -> str:
    """Strict JSON (no NaN or Infinity: they become null), UTF-8 text kept as it is but for U+0085, U+2028 and
    U+2029 (escaped, so that no line reader splits a record); values JSON has no type for (from Parquet: dates,
    times, decimals, bytes) written as text. Writing never fails: a record that still cannot be written (nested
    past the stack) is written as its ``repr``, capped, with a note why."""
    return _LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", _json_text(element))


def _json_text(element: Any) -> str:
    try:
        return json.dumps(element, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:
        pass
    except Exception as e:  # noqa: BLE001 - the writer must not fail the job
        return _unwritable(element, e)
    try:
        return json.dumps(_finite(element), ensure_ascii=False, allow_nan=False, default=_json_default)
    except Exception as e:  # noqa: BLE001
        return _unwritable(element, e)


def _unwritable(element: Any, error: Exception) -> str:
    try:
        text = repr(element)
    except Exception:  # noqa: BLE001 - a repr that recurses too deeply, too
        text = f"<{type(element).__name__}>"
    text = text if len(text) <= 10_000 else text[:10_000] + "..."
    return json.dumps({"unwritable": text, "error": f"cannot be written as JSON: {type(error).__name__}: {error}"})


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact, as JSON numbers from a float would not be
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def input_folder(pattern: str) -> str:
    """The folder of an input path or glob (local or any Beam filesystem)."""
    parts = pattern.split("/")
    for i, part in enumerate(parts[:-1]):
        if any(c in part for c in "*?["):
            parts = parts[: i + 1]
            break
    folder = "/".join(parts[:-1])
    return folder or ("/" if pattern.startswith("/") else ".")


def absolute(path: str | None) -> str | None:
    """A local path made absolute against the launcher's folder (workers run in other folders); others as given."""
    if path is None or has_scheme(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    try:
        is_positive_int("the value", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _count_or_zero(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's arguments (a recipe's settings as defaults that flags override), and Beam's (checked)."""
    parser = make_parser("beamcap-caption", __doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="JSONL or Parquet files: paths or quoted globs ('data/*.jsonl'), local or gs://, s3://, ... "
        "(required, unless --recipe gives dataset_path)",
    )
    io.add_argument(
        "--output",
        metavar="PREFIX",
        help="output path prefix; with --recipe, its export_path is the one output file "
        "(required, unless --recipe gives export_path)",
    )
    io.add_argument(
        "--output_format", choices=["jsonl", "parquet"], default=None, help="default: parquet when --output ends in "
        ".parquet, else jsonl",
    )  # fmt: skip
    io.add_argument(
        "--failed_output",
        default=None,
        metavar="PREFIX",
        help="write samples that cannot be captioned, and lines that are not JSON, here (JSONL with the reason) "
        "and go on; without it the job stops at the first one (default: %(default)s)",
    )
    io.add_argument(
        "--max_line_bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longest JSONL line read; a longer one goes to the failed output, never held whole (default: 64 MiB)",
    )
    io.add_argument(
        "--num_shards", type=_count_or_zero, default=0, help="output files (default: 0, the runner decides)"
    )
    io.add_argument("--recipe", default=None, help="a Data-Juicer recipe (YAML) with an image_captioning_mapper")
    io.add_argument("--skip_other_ops", action="store_true", help="with --recipe: run only the captioning op")
    io.add_argument("--verbose", action="store_true", help="Beam's and the libraries' logs, and tracebacks")
    add_caption_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    check_beam_arguments(parser, beam_args)
    output_from_flag = args.output is not None
    if args.recipe:
        parser.set_defaults(**load_recipe(args.recipe, args.skip_other_ops))
        args, beam_args = parser.parse_known_args(argv)
    # A recipe's export_path is one file, as Data-Juicer writes it; an --output flag is a prefix.
    args.single_file = bool(args.recipe) and not output_from_flag and args.num_shards == 0
    if not args.input or not args.output:
        raise UserError("--input and --output are required (or a --recipe with dataset_path and export_path)")
    if isinstance(args.input, str):  # from a recipe
        args.input = [args.input]
    if args.output_format is None:
        args.output_format = "parquet" if _is_parquet(args.output) else "jsonl"
    return args, beam_args


def resolve_paths(args: argparse.Namespace) -> None:
    """Every local path made absolute on the launcher, and the folder relative image paths resolve against."""
    args.input = [absolute(p) for p in args.input]
    for name in ("output", "failed_output", "image_root", "image_base_dir"):
        setattr(args, name, absolute(getattr(args, name)))
    if (
        isinstance(args.hf_img2seq, str)
        and not has_scheme(args.hf_img2seq)
        and os.path.exists(os.path.expanduser(args.hf_img2seq))
    ):  # (a value of another type, from a recipe, is refused with the configuration's message)
        args.hf_img2seq = absolute(args.hf_img2seq)
    if args.image_root is None and args.image_base_dir is None:
        folders = sorted({input_folder(p) for p in args.input})
        if len(folders) > 1:
            raise UserError(
                f"the inputs are in different folders ({', '.join(folders)}), so relative image paths are "
                "ambiguous (pass --image_base_dir, the folder they are relative to)"
            )
        args.image_base_dir = folders[0]


def _is_parquet(path: str) -> bool:
    """Whether a matched file is read as Parquet (by its own name, in any case, as Beam reads a compression
    suffix, so a glob may match both kinds)."""
    return path.lower().endswith(".parquet")


PARQUET_GROUP_BOUND = 16
"""A Parquet row group of more than this many times ``--max_line_bytes`` uncompressed (all its columns together),
or of more values than a line that long could hold, is not read (its pages are inflated whole): the Parquet side
of the line limit."""


def _named_twice(names: list[str]) -> list[str]:
    """The column names that occur more than once (pyarrow's rows would keep only the last of them)."""
    return sorted(name for name, times in collections.Counter(names).items() if times > 1)


def _value_count(array: Any) -> int:
    """How many values an Arrow array holds, nested ones included: what its Python objects will number."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_struct(kind):
        return len(array) + sum(_value_count(child) for child in array.flatten())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):  # maps too
        return len(array) + _value_count(array.flatten())
    if hasattr(pa.types, "is_list_view") and (pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind)):
        return len(array) + _value_count(array.flatten())
    return len(array)


def parquet_rows(f: Any, max_row_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """(row number from 1, the row as a sample or "", None or what is wrong) for each row of an open Parquet file,
    read one row at a time: memory holds one row and the pages it is decoded from. A row holds at most as many values
    as a JSON line of ``max_row_bytes`` could (one per ``BYTES_PER_VALUE`` bytes). A row group too large to read is
    one entry. A file that cannot be read gives one entry saying why (after the rows read up to there)."""
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(f)
        twice = _named_twice(parquet.schema_arrow.names)
        if twice:
            yield 1, "", f"it has more than one column named {_capped(twice)}: which one is meant is unclear"
            return
        group_limit, value_limit = PARQUET_GROUP_BOUND * max_row_bytes, max_row_bytes // BYTES_PER_VALUE
        for group in range(parquet.metadata.num_row_groups):
            meta = parquet.metadata.row_group(group)
            columns = [meta.column(c) for c in range(meta.num_columns)]
            size = sum(c.total_uncompressed_size for c in columns)
            values = sum(c.num_values for c in columns)
            if size > group_limit or values > PARQUET_GROUP_BOUND * value_limit:
                problem = (
                    f"row group {group} (rows {number + 1}-{number + meta.num_rows}) holds {size} bytes "
                    f"uncompressed in {values} values, over {group_limit} bytes or "
                    f"{PARQUET_GROUP_BOUND * value_limit} values ({PARQUET_GROUP_BOUND} x what --max_line_bytes "
                    "allows a line): its rows are not read (write smaller row groups)"
                )
                yield number + 1, "", problem
                number += meta.num_rows
                continue
            for batch in parquet.iter_batches(batch_size=1, row_groups=[group], use_threads=False):
                number += 1
                if batch.nbytes > max_row_bytes:
                    problem = f"the row is {batch.nbytes} bytes, over the --max_line_bytes limit of {max_row_bytes}"
                    yield number, "", problem
                    continue
                values = sum(_value_count(column) for column in batch.columns)
                if values > value_limit:
                    problem = (
                        f"the row holds {values} values, more than a line of --max_line_bytes ({max_row_bytes}) "
                        f"could ({value_limit})"
                    )
                    yield number, "", problem
                    continue
                try:
                    (row,) = batch.to_pylist()
                except Exception as e:  # noqa: BLE001 - a value Python cannot hold (a timestamp past year 9999, ...)
                    yield number, "", f"a value does not convert: {type(e).__name__}: {_capped(e)}"
                    continue
                yield number, row, None
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated, corrupt pages: pyarrow raises several kinds
        what = "cannot read on" if number else "cannot read as Parquet"
        yield number + 1, "", f"{what}: {type(e).__name__}: {_capped(e)}"


def _capped(value: Any) -> str:
    return printable(str(value))


def parquet_records(file: fileio.ReadableFile, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """:func:`numbered_lines`'s entries for a matched Parquet file: (path, row number, (the row as a sample or "",
    None or what is wrong), ``READ``). Beam's Parquet reader would fail the job on a bad file, and holds whole row
    groups in memory."""
    path = file.metadata.path
    try:
        f = file.open(compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # noqa: BLE001 - a folder, a vanished file, a filesystem error
        yield path, 1, ("", f"cannot open: {type(e).__name__}: {_capped(e)}"), READ
        return
    with f:
        for number, sample, problem in parquet_rows(f, max_line_bytes):
            yield path, number, (sample, problem), READ


def read_records(file: fileio.ReadableFile, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """A matched file's numbered entries for :class:`ParseRecord`: its rows when its name ends in ``.parquet``, else
    its JSONL lines (compressed or not)."""
    if _is_parquet(file.metadata.path):
        return parquet_records(file, max_line_bytes)
    return numbered_lines(file, max_line_bytes)


def parquet_schema(inputs: list[str], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """The schema for Parquet output: the input's (Parquet), or that of the samples on the first JSON lines (lines
    that are not JSON object samples are left out here; the job sends them to the failed output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (first, *_) = FileSystems.match([inputs[0]])[0].metadata_list
    if _is_parquet(first.path):
        try:
            with FileSystems.open(first.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                schema = pq.read_schema(f)  # the footer only
        except Exception as e:  # noqa: BLE001 - not Parquet, truncated, unreadable
            raise UserError(f"cannot read the Parquet schema of {first.path} for the output: {_capped(e)}") from None
        twice = _named_twice(schema.names)
        if twice:
            raise UserError(f"{first.path} has more than one column named {_capped(twice)}; rename them")
        return schema
    rows, taken = [], 0
    for _, number, line, length in numbered_lines(fileio.ReadableFile(first), max_line_bytes):
        if number > SCHEMA_LINES or (number > 1 and taken + length > SCHEMA_BYTES):
            break
        taken += max(length, 0)
        sample, problem = parse_json_line(line) if 0 <= length <= max_line_bytes else (None, "unreadable")
        if problem is None and isinstance(sample, dict):
            rows.append(sample)
    if not rows:
        raise UserError(
            f"none of the first lines of {first.path} (up to {SCHEMA_LINES}, or {SCHEMA_BYTES >> 20} MiB) is a JSON "
            "object, so Parquet output has no "
            "schema to take (write JSONL instead: --output_format jsonl)"
        )
    try:
        return pa.Table.from_pylist(rows).schema
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
        raise UserError(
            f"the first lines of {first.path} (up to {SCHEMA_LINES}, or {SCHEMA_BYTES >> 20} MiB) give no one Parquet "
            f"schema ({e}); write JSONL instead: "
            "--output_format jsonl"
        ) from None


def _same(a: Any, b: Any) -> bool:
    """Whether ``a``, a value read back from Parquet, is the record's ``b`` (NaN equal to NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):  # a key the record lacks is read back as null, as Beam writes it
        return b.keys() <= a.keys() and all(_same(a[k], b[k]) if k in b else a[k] is None for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class FitParquetSchema(beam.DoFn):
    """Records to rows of the Parquet schema (a field the record lacks is null); a record with a field the schema
    lacks, or a value of another type, goes to ``failed`` (Beam's Parquet sink would fail the job, or drop it)."""

    FAILED = "failed"

    def __init__(self, schema):
        self._schema = schema
        self._unfit = Metrics.counter(METRICS_NAMESPACE, "records_unfit")

    def process(self, record: Any):
        import pyarrow as pa

        names = self._schema.names
        problem = None
        if not isinstance(record, dict):
            problem = f"a {type(record).__name__} is not a record"
        elif extra := [k for k in record if k not in names]:
            problem = f"its fields {extra!r} are not in the Parquet schema, which has {names!r}"
        else:
            row = {name: record.get(name) for name in names}
            try:
                written = pa.Table.from_pylist([row], schema=self._schema).to_pylist()[0]
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a value of another type
                problem = f"a value does not fit the Parquet schema: {type(e).__name__}: {e}"
            else:  # pyarrow converts some values it should not keep: 2.5 in an int column, a struct's extra keys
                changed = [name for name in names if not _same(written[name], row[name])]
                if changed:
                    problem = f"the values of {changed!r} would change to fit the Parquet schema"
        if problem is None:
            yield row
            return
        self._unfit.inc()
        yield beam.pvalue.TaggedOutput(
            self.FAILED,
            {"sample": record, "error": f"cannot be written to Parquet: {problem} (the schema is the input's, or "
             f"that of its first lines; --output_format jsonl writes any record)"},
        )  # fmt: skip


def read_samples(pipeline: beam.Pipeline, inputs: list[str], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
    """(samples, unreadable lines and rows as failure records): each matched file is read as Parquet when its name
    ends in ``.parquet``, else as JSONL (compressed or not)."""
    # One read step, one Reshuffle, one parse step for both formats: Flink's portable runner refused a per-format
    # Partition whose branches were flattened back together ("PCollectionNodes [...] were consumed but never
    # produced"), where this shape (the one JSONL alone had) runs.
    parsed = (
        pipeline
        | "Inputs" >> beam.Create(inputs)
        | "MatchFiles" >> fileio.MatchAll()
        | "ReadMatches" >> fileio.ReadMatches()
        | "ReadRecords" >> beam.FlatMap(read_records, max_line_bytes)
        | "Spread" >> beam.Reshuffle()
        | "Parse" >> beam.ParDo(ParseRecord(max_line_bytes)).with_outputs(ParseRecord.FAILED, main="samples")
    )
    return parsed.samples, parsed[ParseRecord.FAILED]


def _count(element: Any, counter) -> Any:
    counter.inc()
    return element


def write_records(records, path: str, num_shards: int, single_file: bool, schema=None, label: str = "Write"):
    """JSONL (or Parquet with ``schema``) files at the prefix ``path``; with ``single_file``, exactly ``path``."""
    counter = Metrics.counter(METRICS_NAMESPACE, "failures_written" if label == "WriteFailed" else "records_written")
    records = records | f"{label}Count" >> beam.Map(_count, counter)
    naming = {"shard_name_template": "", "file_name_suffix": ""} if single_file else {}
    if schema is not None:
        naming = {"file_name_suffix": ".parquet", **naming}
        return records | label >> beam.io.WriteToParquet(path, schema, num_shards=num_shards, **naming)
    naming = {"file_name_suffix": ".jsonl", **naming}
    return (
        records
        | f"{label}ToJson" >> beam.Map(to_json_line)
        | label >> beam.io.WriteToText(path, num_shards=num_shards, **naming)
    )


def _stop_at(record: dict) -> None:
    raise SampleError(f"{record['error']} (use --failed_output PATH to write such samples to a file and go on)")


def build(pipeline: beam.Pipeline, args: argparse.Namespace, config: CaptionConfig) -> None:
    """Add the job's steps to ``pipeline``."""
    schema = parquet_schema(args.input, args.max_line_bytes) if args.output_format == "parquet" else None
    samples, bad_lines = read_samples(pipeline, args.input, args.max_line_bytes)
    good, failed = samples | "CaptionImages" >> CaptionImages.from_config(config).with_exception_handling()
    failures = [failed, bad_lines]
    if schema is not None:
        fitted = good | "FitParquetSchema" >> beam.ParDo(FitParquetSchema(schema)).with_outputs(
            FitParquetSchema.FAILED, main="rows"
        )
        good = fitted.rows
        failures.append(fitted[FitParquetSchema.FAILED])
    if len(failures) > 1:
        failed = tuple(failures) | "AllFailures" >> beam.Flatten()
    if args.failed_output:
        write_records(failed, args.failed_output, args.num_shards, single_file=False, label="WriteFailed")
    else:
        failed | "StopAtFirstFailure" >> beam.Map(_stop_at)
    write_records(good, args.output, args.num_shards, args.single_file, schema, label="WriteCaptioned")


SUMMARY_COUNTERS = (
    "lines_read", "lines_unparseable", "samples_in", "samples_failed", "images_captioned", "generated_samples",
    "original_samples", "records_written", "failures_written", "model_loads",
)  # fmt: skip
"""Always in the summary, 0 when nothing was counted."""


def summary(result: beam.runners.runner.PipelineResult, wall_secs: float) -> dict[str, Any]:
    """The job's totals, from its Beam metrics: lines read = samples in + unparseable lines;
    samples in = samples captioned or passed through + samples failed; and the dtype the model ran in."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    totals: dict[str, Any] = dict.fromkeys(SUMMARY_COUNTERS, 0)
    dtypes = set()
    for counter in metrics["counters"]:
        name = counter.key.metric.name
        if name.startswith(LOADS_IN):
            dtypes.add(name.removeprefix(LOADS_IN))
        else:
            totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
    totals["dtype"] = ",".join(sorted(dtypes)) or None
    totals["wall_secs"] = round(wall_secs, 1)
    images = totals.get("images_captioned", 0)
    totals["images_per_sec"] = round(images / wall_secs, 2) if wall_secs > 0 else 0.0
    return totals


def _temp_folders(prefixes: list[str]) -> set[str]:
    """What Beam's file sinks leave beside these output prefixes while they write: ``beam-temp-*`` folders (local),
    or the objects under such prefixes (other filesystems, which have no folders)."""
    found: set[str] = set()
    for prefix in prefixes:
        pattern = f"{os.path.dirname(prefix) or '.'}/beam-temp-{os.path.basename(prefix)}-*"
        if not has_scheme(prefix):
            found.update(glob.glob(glob.escape(pattern[: -len("beam-temp-*")]) + pattern[-len("beam-temp-*") :]))
            continue
        try:
            found.update(m.path for m in FileSystems.match([pattern + "/*"])[0].metadata_list)
        except Exception:  # noqa: BLE001 - a prefix that cannot be listed has nothing of ours
            pass
    return found


def _remove_temp_folders(before: set[str], prefixes: list[str]) -> None:
    """Remove what a failed run's file sinks left behind, and nothing that was there before it."""
    for path in sorted(_temp_folders(prefixes) - before):
        try:
            if has_scheme(path):
                FileSystems.delete([path])
            else:
                shutil.rmtree(path)
        except Exception as e:  # noqa: BLE001 - cleaning up must not hide the run's own error
            _LOGGER.warning("Could not remove %s: %s", path, e)


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = LOCAL_RUNNER
    return options


def run(argv: list[str] | None = None, save_main_session: bool = True):
    """Build and run the job; returns the finished ``PipelineResult``. Raises :class:`UserError` before any work
    for what the user can fix (arguments, inputs, recipe, model, device)."""
    args, beam_args = parse_args(argv)
    resolve_paths(args)
    options = pipeline_options(beam_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    try:
        config = config_from_args(args)
    except ValueError as e:
        message = str(e)
        if message.split(" ", 1)[0] in {p.name for p in parameters()}:  # the parameter named is a flag
            message = "--" + message
        raise UserError(message) from None
    check_inputs(args.input)
    check_model(config.hf_img2seq)
    check_device(config.device, options.view_as(StandardOptions).runner)
    prefixes = [p for p in (args.output, args.failed_output) if p]
    before = _temp_folders(prefixes)
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, args, config)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException:
        _remove_temp_folders(before, prefixes)
        raise
    totals = summary(result, time.perf_counter() - start)
    print("beamcap summary:", json.dumps(totals, sort_keys=True))
    return result


def sample_failure(error: BaseException) -> str | None:
    """The reason of the sample that stopped the job, when ``error`` (as a runner re-raises it) is that."""
    text = "".join(traceback.format_exception(error))
    marker = f"{SampleError.__name__}: "
    if marker not in text:
        return None
    reason = text[text.rindex(marker) + len(marker) :].splitlines()[0]
    return re.sub(r" \[while running '[^']*'\]$", "", reason)


if __name__ == "__main__":
    from pipelines.cli import main

    main()
