"""Command-line flags for every CaptionImages parameter, and the config they make."""

from __future__ import annotations

import argparse
import json
from typing import Any

from beamcap.config import DEFAULT_MODEL, DTYPES, CaptionConfig
from beamcap.retention import KeepMode


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per CaptionImages parameter, with its default."""
    g = parser.add_argument_group("captioning (CaptionImages parameters)")
    g.add_argument("--hf_img2seq", default=DEFAULT_MODEL, help="hub id, save_pretrained folder or 'beamcap-demo'")
    g.add_argument("--trust_remote_code", type=_bool, default=False)
    g.add_argument("--caption_num", type=int, default=1)
    g.add_argument("--keep_candidate_mode", default="random_any", choices=[m.value for m in KeepMode])
    g.add_argument("--keep_original_sample", type=_bool, default=True)
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt_key", default=None)
    g.add_argument("--gpu_batch_size", type=int, default=8)
    g.add_argument("--text_key", default="text")
    g.add_argument("--image_key", default="images")
    g.add_argument("--image_token", default=CaptionConfig.image_token)
    g.add_argument("--eoc_token", default=CaptionConfig.eoc_token)
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--do_sample", type=_bool, default=True)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--torch_dtype", default=None, choices=list(DTYPES))
    g.add_argument("--image_root", default=None, help="confine image reads to this folder")
    g.add_argument(
        "--image_base_dir", default=None, help="relative image paths resolve here (default: the input's folder)"
    )
    g.add_argument("--max_image_pixels", type=int, default=CaptionConfig.max_image_pixels)
    g.add_argument("--max_input_pixels", type=int, default=None, help="downscale larger images before the model")
    g.add_argument("--min_batch_size", type=int, default=1)
    g.add_argument("--max_batch_size", type=int, default=None)
    g.add_argument("--large_model", type=_bool, default=False, help="one model per machine, shared by processes")
    g.add_argument("--model_copies", type=int, default=None)
    g.add_argument(
        "--max_batch_duration_secs", type=float, default=None, help="streaming: longest wait for a batch to fill"
    )
    g.add_argument("--streaming_shards", type=int, default=1, help="streaming: keys batches are formed under")
    g.add_argument(
        "--prefetch_images", type=_bool, default=False, help="read the next batch's images while one generates"
    )
    g.add_argument("--generate_kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"num_beams\": 3}'")


CAPTION_FIELDS = [
    "hf_img2seq", "trust_remote_code", "caption_num", "keep_candidate_mode", "keep_original_sample", "prompt",
    "prompt_key", "gpu_batch_size", "text_key", "image_key", "image_token", "eoc_token", "max_new_tokens",
    "do_sample", "seed", "device", "torch_dtype", "image_root", "image_base_dir", "max_image_pixels", "max_input_pixels",
    "min_batch_size", "max_batch_size", "large_model", "model_copies", "max_batch_duration_secs", "streaming_shards",
    "prefetch_images", "generate_kwargs",
]  # fmt: skip


def config_from_args(args: argparse.Namespace, **overrides: Any) -> CaptionConfig:
    values = {name: getattr(args, name) for name in CAPTION_FIELDS}
    values.update(overrides)
    return CaptionConfig(**values)
