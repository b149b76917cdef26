"""Start a Beam Python SDK worker for Flink's PROCESS environment (what Beam's container boot does, without Docker).

A TaskManager runs ``<command> --id=ID --provision_endpoint=HOST:PORT --control_endpoint=... --logging_endpoint=...``
for each SDK worker it needs. This asks the provision service for the pipeline options, then becomes
``apache_beam.runners.worker.sdk_worker_main`` in this interpreter, configured by the environment variables that
module reads. The worker uses what is installed in this interpreter (beamcap and its dependencies); files the job
stages as artifacts are not installed. ``beamcap-flink start`` writes the command that runs this module.
"""

from __future__ import annotations

import argparse
import os
import sys


def worker_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment ``sdk_worker_main`` reads, from the provision service and the runner's arguments."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc
    from google.protobuf import json_format

    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = (
            beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
            .GetProvisionInfo(
                beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", args.id)], timeout=60
            )
            .info
        )
    env = dict(os.environ)
    env["WORKER_ID"] = args.id
    env["PIPELINE_OPTIONS"] = json_format.MessageToJson(info.pipeline_options)
    env["CONTROL_API_SERVICE_DESCRIPTOR"] = f"url: '{info.control_endpoint.url or args.control_endpoint}'"
    env["LOGGING_API_SERVICE_DESCRIPTOR"] = f"url: '{info.logging_endpoint.url or args.logging_endpoint}'"
    if info.runner_capabilities:
        env["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("id", "provision_endpoint", "control_endpoint", "logging_endpoint", "artifact_endpoint"):
        parser.add_argument(f"--{name}", default="")
    args, _ = parser.parse_known_args(argv)
    env = worker_environment(args)
    os.execve(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"], env)


if __name__ == "__main__":
    main()
