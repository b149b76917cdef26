"""The captioning job: Data-Juicer JSONL in, captioned JSONL out.

    beamcap-caption --input data/*.jsonl --output out/captioned \\
        --hf_img2seq beamcap-demo --failed_output out/failed [Beam pipeline options]

Relative image paths resolve against the input's folder unless
``--image_base_dir`` or ``--image_root`` says otherwise. Without
``--failed_output`` the job fails on the first sample that cannot be captioned.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from beamcap.metrics import METRICS_NAMESPACE
from beamcap.transform import CaptionImages
from pipelines.options import add_caption_arguments, config_from_args
from pipelines.recipe import load_recipe

_LOGGER = logging.getLogger(__name__)


class ParseJsonLine(beam.DoFn):
    """JSON lines to samples; a line that is not JSON goes to ``failed`` with the reason."""

    FAILED = "failed"

    def process(self, line: str):
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield beam.pvalue.TaggedOutput(self.FAILED, {"sample": line, "error": f"invalid JSON line: {e}"})


def to_json_line(element: Any) -> str:
    return json.dumps(element, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def input_folder(pattern: str) -> str:
    """The folder of an input path or glob (local or any Beam filesystem)."""
    parts = pattern.split("/")
    for i, part in enumerate(parts[:-1]):
        if any(c in part for c in "*?["):
            parts = parts[: i + 1]
            break
    folder = "/".join(parts[:-1])
    return folder or ("/" if pattern.startswith("/") else ".")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's arguments (a recipe's settings as defaults that flags override), and Beam's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", help="JSONL or Parquet file(s): a path or glob, local or gs://, s3://, ...")
    io.add_argument("--output", help="output path prefix (or, with --recipe, the recipe's export_path file)")
    io.add_argument("--output_format", choices=["jsonl", "parquet"], default=None, help="default: from --output")
    io.add_argument("--failed_output", default=None, help="path prefix for failed samples (JSONL with the reason)")
    io.add_argument("--num_shards", type=int, default=0, help="output files (0: the runner decides)")
    io.add_argument("--recipe", default=None, help="a Data-Juicer recipe (YAML) with an image_captioning_mapper")
    io.add_argument("--skip_other_ops", action="store_true", help="with --recipe: run only the captioning op")
    add_caption_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    output_from_flag = args.output is not None
    if args.recipe:
        parser.set_defaults(**load_recipe(args.recipe, args.skip_other_ops))
        args, beam_args = parser.parse_known_args(argv)
    # A recipe's export_path is one file, as Data-Juicer writes it; an --output flag is a prefix.
    args.single_file = bool(args.recipe) and not output_from_flag and args.num_shards == 0
    if not args.input or not args.output:
        parser.error("--input and --output are required (or a --recipe with dataset_path and export_path)")
    if args.output_format is None:
        args.output_format = "parquet" if args.output.endswith(".parquet") else "jsonl"
    return args, beam_args


def _is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def parquet_schema(input_pattern: str):
    """The schema for Parquet output: the input's (Parquet) or that of its first JSON lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    (first, *_) = FileSystems.match([input_pattern])[0].metadata_list
    with FileSystems.open(first.path) as f:
        if _is_parquet(input_pattern):
            return pq.read_schema(pa.BufferReader(f.read()))
        rows = [json.loads(line) for line in f.read().decode("utf-8").splitlines()[:200] if line.strip()]
    return pa.Table.from_pylist(rows).schema


def read_samples(pipeline: beam.Pipeline, args: argparse.Namespace):
    """(samples, unparseable lines as failure records or None)."""
    if _is_parquet(args.input):
        return pipeline | "ReadParquet" >> beam.io.ReadFromParquet(args.input), None
    parsed = (
        pipeline
        | "ReadJsonl" >> beam.io.ReadFromText(args.input)
        | "ParseJson" >> beam.ParDo(ParseJsonLine()).with_outputs(ParseJsonLine.FAILED, main="samples")
    )
    return parsed.samples, parsed[ParseJsonLine.FAILED]


def write_records(records, path: str, num_shards: int, single_file: bool, schema=None, label: str = "Write"):
    """JSONL (or Parquet with ``schema``) files at the prefix ``path``; with ``single_file``, exactly ``path``."""
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


def build(pipeline: beam.Pipeline, args: argparse.Namespace) -> None:
    """Add the job's steps to ``pipeline``."""
    base_dir = None if args.image_root else (args.image_base_dir or input_folder(args.input))
    transform = CaptionImages.from_config(config_from_args(args, image_base_dir=base_dir))
    schema = parquet_schema(args.input) if args.output_format == "parquet" else None
    samples, bad_lines = read_samples(pipeline, args)
    if args.failed_output:
        good, failed = samples | "CaptionImages" >> transform.with_exception_handling()
        if bad_lines is not None:
            failed = (failed, bad_lines) | "AllFailures" >> beam.Flatten()
        write_records(failed, args.failed_output, args.num_shards, single_file=False, label="WriteFailed")
    else:
        good = samples | "CaptionImages" >> transform
        if bad_lines is not None:
            bad_lines | "FailOnBadJson" >> beam.Map(_raise_bad_json)
    write_records(good, args.output, args.num_shards, args.single_file, schema, label="WriteCaptioned")


def _raise_bad_json(record: dict) -> None:
    raise ValueError(f"{record['error']}: {record['sample'][:200]!r} (use --failed_output to route bad lines)")


def summary(result: beam.runners.runner.PipelineResult, wall_secs: float) -> dict[str, Any]:
    """The job's totals, from its Beam metrics."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    totals: dict[str, Any] = {}
    for counter in metrics["counters"]:
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
    totals["wall_secs"] = round(wall_secs, 1)
    images = totals.get("images_captioned", 0)
    totals["images_per_sec"] = round(images / wall_secs, 2) if wall_secs > 0 else 0.0
    return totals


def run(argv: list[str] | None = None, save_main_session: bool = True):
    """Build and run the job; returns the finished ``PipelineResult``."""
    args, pipeline_args = parse_args(argv)
    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, args)
    result = pipeline.run()
    result.wait_until_finish()
    totals = summary(result, time.perf_counter() - start)
    print("beamcap summary:", json.dumps(totals, sort_keys=True))
    return result


def main() -> None:
    logging.getLogger().setLevel(logging.INFO)
    run()


if __name__ == "__main__":
    main()
