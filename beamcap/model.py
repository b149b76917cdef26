"""Loading an image-to-text model and running ``generate`` on a batch of images.

Loading goes through the Auto classes (``AutoModelForImageTextToText`` with
``AutoProcessor``, or ``AutoImageProcessor`` + ``AutoTokenizer`` for
VisionEncoderDecoder folders), under a process-wide lock: concurrent
``from_pretrained`` calls in one process are not safe. The device and dtype
are resolved here, on the worker, never on the launcher.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from beamcap.config import CaptionConfig
from beamcap.generation import generate
from beamcap.paths import has_scheme
from beamcap.sampling import seeded_settings
from beamcap.seeding import derive_seed

_LOGGER = logging.getLogger(__name__)
_LOAD_LOCK = threading.Lock()
DEMO_MODEL_ALIAS = "beamcap-demo"
DEFAULT_CHAT_PROMPT = "Describe this image."
DEFAULT_TASK_PROMPT = "<CAPTION>"
TASK_MODEL_TYPES = frozenset({"florence2"})


def input_kind(model_config: Any, processor: Any) -> str:
    """How a model wants its prompt, from its loaded config and processor (never its name).

    ``'chat'``: the processor has a chat template: the prompt becomes a user
    message with the image. ``'task'``: Florence-2-style task tokens.
    ``'prefix'``: BLIP, BLIP-2, GIT, PaliGemma, VisionEncoderDecoder: the
    prompt is a text prefix, as in the reference.
    """
    if processor is None:
        return "prefix"
    if model_config.model_type in TASK_MODEL_TYPES:
        return "task"
    if getattr(processor, "chat_template", None):
        return "chat"
    return "prefix"


def resolve_model_path(hf_img2seq: str) -> str:
    """A folder or hub id ``from_pretrained`` can load.

    ``'beamcap-demo'`` names the bundled demo model; a Beam filesystem path
    (``gs://``, ``s3://``, ...) is copied once to a local cache.
    """
    if hf_img2seq == DEMO_MODEL_ALIAS:
        from beamcap.demo import demo_model_path

        return demo_model_path()
    if has_scheme(hf_img2seq):
        return localize_model_folder(hf_img2seq)
    return hf_img2seq


def model_cache_dir() -> str:
    return os.environ.get("BEAMCAP_MODEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beamcap", "models"))


def localize_model_folder(path: str) -> str:
    """Copy the files of a model folder on any Beam filesystem to a local cache, once.

    The copy goes to a temporary folder renamed into place, so concurrent
    workers never load a half-copied model. Only the folder's own files are
    copied (``save_pretrained`` writes no subfolders).
    """
    from apache_beam.io.filesystems import FileSystems

    target = os.path.join(model_cache_dir(), hashlib.sha256(path.encode()).hexdigest()[:20])
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    folder = path.rstrip("/")
    files = [m.path for m in FileSystems.match([folder + "/*"])[0].metadata_list]
    if not any(f.endswith("/config.json") for f in files):
        raise FileNotFoundError(f"{path} holds no config.json: is it a folder written by save_pretrained?")
    os.makedirs(model_cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(dir=model_cache_dir(), prefix=".partial-")
    _LOGGER.info("Copying %d model files from %s to %s.", len(files), path, target)
    for source in files:
        with FileSystems.open(source) as src, open(os.path.join(staging, source.rsplit("/", 1)[-1]), "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_device(requested: str | None) -> torch.device:
    """``requested``, or ``cuda`` when a GPU is visible, else ``cpu``."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | str:
    """The weights' dtype: float32 on CPU, bfloat16 (else float16) on CUDA unless set."""
    if name == "auto":
        return "auto"
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory error (CUDA or otherwise)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom_type) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _image_token_id(processor: Any) -> int | None:
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(str(token))
    return None if token_id == tokenizer.unk_token_id else token_id


def align_image_token_id(model: Any, processor: Any) -> None:
    """Make the model look for the image token the processor actually inserts.

    The reference forces ``image_token_index = 50265`` (right only for OPT-based
    BLIP-2); beamcap reads the id from the processor's tokenizer instead.
    """
    token_id = _image_token_id(processor)
    if token_id is None:
        return
    for attr in ("image_token_id", "image_token_index"):
        current = getattr(model.config, attr, token_id)
        if current != token_id:
            _LOGGER.warning(
                "Setting model.config.%s from %s to the processor's image token id %s.", attr, current, token_id
            )
            setattr(model.config, attr, token_id)


def processor_input_size(image_processor: Any) -> int | None:
    """The largest side the image processor resizes to, when it always resizes to a fixed size."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return None
    if isinstance(size, int):
        return size

    def side(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if any(side(k) for k in ("longest_edge", "max_pixels", "max_height", "max_width")):
        return None  # resolution-dependent resizing: decode in full
    sides = [v for v in (side("height"), side("width"), side("shortest_edge")) if isinstance(v, int)]
    return max(sides) if sides else None


class Captioner:
    """A loaded model with what it needs to caption a list of images in one ``generate`` call."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any, image_processor: Any, device: torch.device):
        self.model = model
        self.kind = input_kind(model.config, processor)
        if self.kind == "chat" and not model.config.is_encoder_decoder and tokenizer is not None:
            tokenizer.padding_side = "left"  # batched decoder-only generation needs the prompt flush right
        self.processor = processor  # None for VisionEncoderDecoder folders
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.load_secs = 0.0
        self._load_reported = False
        self._report_lock = threading.Lock()
        self._accepts = set(inspect.signature(model.forward).parameters)
        self.input_size = processor_input_size(image_processor)

    def prepare(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The model's inputs for these images, all with the same prompt (or none)."""
        if self.processor is None:  # a VisionEncoderDecoder folder: image processor + tokenizer
            inputs = dict(self.image_processor(images=list(images), return_tensors="pt"))
            if prompt:
                start = self.model.config.decoder_start_token_id
                prefix = [start, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
                inputs["decoder_input_ids"] = torch.tensor([prefix] * len(images), dtype=torch.long)
        else:
            text = [self.prompt_text(prompt)] * len(images) if prompt is not None or self.kind != "prefix" else None
            padding = {"padding": True} if self.kind == "chat" else {}
            inputs = dict(self.processor(images=list(images), text=text, return_tensors="pt", **padding))
        if "token_type_ids" in inputs and "token_type_ids" not in self._accepts:
            del inputs["token_type_ids"]
        return self.on_device(inputs)

    def on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors moved to the model's device; floating-point ones cast to its dtype."""
        return {
            k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }

    def claim_load_report(self) -> bool:
        """True for the first caller only: whoever gets it reports this load in the metrics.

        The model may be shared by threads, DoFn instances, or (``large_model``) processes:
        asking the model itself counts each load once.
        """
        with self._report_lock:
            first, self._load_reported = not self._load_reported, True
            return first

    def info(self) -> dict[str, Any]:
        """Plain facts about the loaded model (readable through a cross-process proxy)."""
        return {
            "input_size": self.input_size,
            "load_secs": self.load_secs,
            "kind": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def prompt_text(self, prompt: str | None) -> str:
        """The text input for one image: the prompt, a task token, or a rendered chat turn."""
        if self.kind == "task":
            return prompt or DEFAULT_TASK_PROMPT
        if self.kind == "chat":
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": prompt or DEFAULT_CHAT_PROMPT}],
                }
            ]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt

    def decode(self, sequences: torch.Tensor, input_length: int = 0) -> list[str]:
        """Generated token ids to text, special tokens skipped.

        Prefix models keep the reference's rule (the whole output, so a BLIP
        prompt starts the caption); chat and task models give only the newly
        generated tokens of a decoder-only model, stripped.
        """
        decoder = self.processor or self.tokenizer
        if self.kind == "prefix":
            return decoder.batch_decode(sequences, skip_special_tokens=True)
        if not self.model.config.is_encoder_decoder:
            sequences = sequences[:, input_length:]
        return [text.strip() for text in decoder.batch_decode(sequences, skip_special_tokens=True)]

    def caption(
        self,
        images: Sequence[Image.Image],
        prompt: str | None,
        settings: dict[str, Any],
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """One ``generate`` call: ``num_return_sequences`` candidates for each image.

        Candidates share their image's work where the model allows (see :mod:`beamcap.generation`).

        With ``seeds`` (one per image) and plain sampling, each candidate is
        drawn from its own seeded stream, so captions do not depend on the
        other images of the call.
        """
        inputs = self.prepare(images, prompt)
        n = settings.get("num_return_sequences", 1)
        if seeds is not None and settings.get("do_sample") and settings.get("num_beams", 1) == 1:
            row_seeds = [derive_seed(seed, candidate) for seed in seeds for candidate in range(n)]
            settings = seeded_settings(self.model, settings, row_seeds)
        with torch.inference_mode():
            sequences = generate(self.model, inputs, settings)
        input_ids = inputs.get("input_ids")
        texts = self.decode(sequences, input_ids.shape[1] if input_ids is not None else 0)
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]


def load_captioner(config: CaptionConfig) -> Captioner:
    """Load processor(s) and model for ``config`` onto the resolved device."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    path = resolve_model_path(config.hf_img2seq)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.torch_dtype, device)
    trust = {"trust_remote_code": config.trust_remote_code}
    with _LOAD_LOCK:
        start = time.perf_counter()
        _LOGGER.info("Loading %s on %s (dtype %s).", path, device, dtype)
        model_config = AutoConfig.from_pretrained(path, **trust)
        if model_config.model_type == "vision-encoder-decoder":
            processor = None
            image_processor = AutoImageProcessor.from_pretrained(path, **trust)
            tokenizer = AutoTokenizer.from_pretrained(path, **trust)
        else:
            processor = AutoProcessor.from_pretrained(path, **trust)
            image_processor = getattr(processor, "image_processor", None)
            tokenizer = getattr(processor, "tokenizer", None)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **trust)
        model.to(device).eval()
        if processor is not None:
            align_image_token_id(model, processor)
        captioner = Captioner(model, processor, tokenizer, image_processor, device)
        captioner.load_secs = time.perf_counter() - start
    _LOGGER.info("Loaded %s in %.1f s.", path, captioner.load_secs)
    return captioner
