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

from beamcap.dofn import METRICS_NAMESPACE
from beamcap.transform import CaptionImages
from pipelines.options import add_caption_arguments, config_from_args

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="JSONL file(s): a path or glob, local or gs://, s3://, ...")
    io.add_argument("--output", required=True, help="output path prefix; files end in .jsonl")
    io.add_argument("--failed_output", default=None, help="path prefix for failed samples (JSONL with the reason)")
    io.add_argument("--num_shards", type=int, default=0, help="output files (0: the runner decides)")
    add_caption_arguments(parser)
    return parser.parse_known_args(argv)


def build(pipeline: beam.Pipeline, args: argparse.Namespace) -> None:
    """Add the job's steps to ``pipeline``."""
    base_dir = args.image_base_dir if args.image_root is None else None
    config = config_from_args(args, image_base_dir=base_dir or (None if args.image_root else input_folder(args.input)))
    transform = CaptionImages.from_config(config)
    parsed = (
        pipeline
        | "ReadJsonl" >> beam.io.ReadFromText(args.input)
        | "ParseJson" >> beam.ParDo(ParseJsonLine()).with_outputs(ParseJsonLine.FAILED, main="samples")
    )
    if args.failed_output:
        good, failed = parsed.samples | "CaptionImages" >> transform.with_exception_handling()
        (
            (failed, parsed[ParseJsonLine.FAILED])
            | "AllFailures" >> beam.Flatten()
            | "FailedToJson" >> beam.Map(to_json_line)
            | "WriteFailed"
            >> beam.io.WriteToText(args.failed_output, file_name_suffix=".jsonl", num_shards=args.num_shards)
        )
    else:
        good = parsed.samples | "CaptionImages" >> transform
        parsed[ParseJsonLine.FAILED] | "FailOnBadJson" >> beam.Map(_raise_bad_json)
    (
        good
        | "ToJson" >> beam.Map(to_json_line)
        | "WriteCaptioned" >> beam.io.WriteToText(args.output, file_name_suffix=".jsonl", num_shards=args.num_shards)
    )


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


def run(argv: list[str] | None = None, save_main_session: bool = True, test_pipeline=None):
    """Build and run the job; returns the finished ``PipelineResult``."""
    args, pipeline_args = parse_args(argv)
    options = PipelineOptions(pipeline_args)
    options.view_as(SetupOptions).save_main_session = save_main_session
    start = time.perf_counter()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(pipeline, args)
    result = pipeline.run()
    result.wait_until_finish()
    totals = summary(result, time.perf_counter() - start)
    _LOGGER.info("beamcap summary: %s", json.dumps(totals, sort_keys=True))
    print("beamcap summary:", json.dumps(totals, sort_keys=True))
    return result


def main() -> None:
    logging.getLogger().setLevel(logging.INFO)
    run()


if __name__ == "__main__":
    main()
