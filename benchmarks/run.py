"""beamcap beside the floor, the reference's method and RunInference: one run, one model, ratios.

    python -m benchmarks.run --quick          # the demo model: about 40 s on 2 quiet cores
    python -m benchmarks.run                  # a BLIP with real (base) dimensions, random weights: slow on CPU
    python -m benchmarks.run --chat           # a tiny chat model (LLaVA, random weights): the chat input path
    python -m benchmarks.run --chat-base      # a LLaVA with 576 image tokens per image: slow on CPU
    python -m benchmarks.run --smoke          # seconds; used by the tests to keep this from rotting

Every method uses the same loaded model, the same 640x480 JPEGs and the same
generation settings (``do_sample=True``; a random-weight model also gets
``min_new_tokens = max_new_tokens`` so every method generates the same length):

- floors: ``model.generate`` alone on tensors preprocessed before timing, with
  the model in float32 and in bfloat16 (with ``caption_num > 1``, beamcap can
  pass them: it runs each image's share of the work once for all candidates,
  see ``beamcap/families/``);
- beamcap: the captioning DoFn's ``process()`` on batches (images read and
  decoded inline, model loaded before timing), at beamcap's default dtype unless
  ``--dtype`` says otherwise: the steady state; and the whole ``CaptionImages``
  pipeline on DirectRunner, wall time including start and load;
- reference: Data-Juicer's method: images decoded inline, the processor called
  per sub-batch of ``gpu_batch_size`` and a full ``generate`` run once per candidate;
- runinference: Beam's RunInference with a ModelHandler doing the same
  preprocessing and one ``generate`` with ``num_return_sequences``; steady state
  (``run_inference`` on batches) and the whole pipeline.

Absolute times on shared machines are noise: read the ratios, measured side by
side with methods interleaved, each repeated (median and min-max spread).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import apache_beam as beam  # noqa: E402
import torch  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, RunInference  # noqa: E402
from apache_beam.transforms.window import GlobalWindows  # noqa: E402
from PIL import Image  # noqa: E402

from beamcap import METRICS_NAMESPACE, CaptionConfig, CaptionImages, demo_model_path  # noqa: E402
from beamcap.batching import into_calls  # noqa: E402
from beamcap.demo.shapes import Scene, draw_scene  # noqa: E402
from beamcap.dofn import CaptionDoFn  # noqa: E402
from beamcap.lifecycle import ModelLifecycle  # noqa: E402
from beamcap.samples import load_images, parse_placed  # noqa: E402
from benchmarks.gpu_busy import GpuBusy  # noqa: E402


@dataclass(frozen=True)
class Case:
    caption_num: int
    batch: int  # images per generate call (gpu_batch_size)
    tokens: int
    samples_per_call: int | None = None  # the reference's grouping of samples (None: = batch)

    def label(self) -> str:
        grouping = f", {self.samples_per_call} samples/call" if self.samples_per_call else ""
        return f"caption_num={self.caption_num}, batch={self.batch}, tokens={self.tokens}{grouping}"


def make_images(folder: str, n: int) -> list[str]:
    rng = random.Random(0)
    paths = []
    for i in range(n):
        scene = Scene(rng.choice(["red", "green", "blue", "yellow"]), rng.choice(["circle", "square"]), 1 + i % 3)
        path = os.path.join(folder, f"img{i:03d}.jpg")
        draw_scene(scene, rng, "eval").resize((640, 480)).save(path, quality=90)
        paths.append(path)
    return paths


def build_blip_base(folder: str) -> str:
    """A BLIP with the dimensions of Salesforce/blip-image-captioning-base, random weights."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30524 - 5)]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BlipConfig(
        text_config=dict(vocab_size=30524, bos_token_id=tok.cls_token_id, pad_token_id=0, sep_token_id=3),
        vision_config=dict(image_size=384),
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tok).save_pretrained(folder)
    return folder


def build_llava_base(folder: str) -> str:
    """A LLaVA that reads 576 image tokens per image, as LLaVA-1.5 does (CLIP at 336 px, patch 14), with a
    6-layer ViT-B-wide vision tower and a 6-layer Llama of width 768: small enough for a CPU, while the
    language model's prompt is as long as a real one's. Random weights."""
    from beamcap.testing.models import build_llava

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12)
    text = dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
    )
    return build_llava(folder, image_size=336, patch_size=14, vision=vision, text=text)


class CaptionHandler(ModelHandler):
    """What a Beam user would write for RunInference: preprocess, one generate, decode.

    In a pipeline it loads the model in ``load_model`` on the worker; the steady-state
    measurement hands it the already loaded model instead (never pickled into a pipeline).
    """

    def __init__(self, config: CaptionConfig, settings, loaded=None):
        super().__init__()
        self._config, self._settings, self._loaded = config, settings, loaded

    def load_model(self):
        from beamcap.model import load_captioner

        return self._loaded if self._loaded is not None else load_captioner(self._config)

    def run_inference(self, batch, model, inference_args=None):
        inputs = model.prepare(batch, None)
        with torch.inference_mode():
            out = model.model.generate(**inputs, **self._settings)
        n = self._settings["num_return_sequences"]
        texts = model.family.decode(out, 0)
        return [texts[i * n : (i + 1) * n] for i in range(len(batch))]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch, "max_batch_size": self._batch}

    def with_batch(self, batch):
        self._batch = batch
        return self


def decode(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


class Bench:
    def __init__(
        self, model_path: str, paths: list[str], extra: dict, torch_dtype: str | None = None, reference_dtype="float32"
    ):
        self.model_path, self.paths, self.extra, self.torch_dtype = model_path, paths, extra, torch_dtype
        self.reference_dtype = reference_dtype
        self.lifecycle: ModelLifecycle | None = None  # beamcap's model, loaded once, shared by every case's DoFn
        self._captioner = None
        self._copies: dict[str, object] = {}  # the model in other dtypes (the floors, the reference), by dtype

    def _config(self, case: Case, **kw) -> CaptionConfig:
        return CaptionConfig(
            self.model_path, caption_num=case.caption_num, keep_candidate_mode="all", gpu_batch_size=case.batch,
            max_new_tokens=case.tokens, device="cpu" if not torch.cuda.is_available() else None,
            generate_kwargs=dict(self.extra, **({"min_new_tokens": case.tokens} if self.extra else {})),
            **{"torch_dtype": self.torch_dtype, **kw},
        )  # fmt: skip

    def dtype_name(self) -> str:
        return str(self._captioner.info().get("dtype", "?")) if self._captioner else "?"

    def _settings(self, case: Case) -> dict:
        return self._config(case).generation_settings()

    def captioner(self, case: Case):
        if self._captioner is None:
            self.lifecycle = ModelLifecycle(self._config(case))
            self._captioner = self.lifecycle.acquire().next()
        return self._captioner

    def model_in(self, case: Case, dtype: str | None):
        """The model in ``dtype``: beamcap's own where that is its dtype (or ``dtype`` is None), else a copy."""
        captioner = self.captioner(case)
        if dtype in (None, self.dtype_name()):
            return captioner
        if dtype not in self._copies:
            from beamcap.model import load_captioner

            self._copies[dtype] = load_captioner(self._config(case, torch_dtype=dtype))
        return self._copies[dtype]

    def reference_captioner(self, case: Case):
        """The model as the reference runs it: Data-Juicer loads it without a dtype (float32 for BLIP checkpoints)."""
        return self.model_in(case, self.reference_dtype)

    def floor(self, case: Case, dtype: str = "float32") -> float:
        """``model.generate`` alone, on tensors preprocessed before timing, with the model in ``dtype``."""
        cap, settings = self.model_in(case, dtype), self._settings(case)
        batches = [cap.prepare([decode(p) for p in self.paths[i : i + case.batch]], None)
                   for i in range(0, len(self.paths), case.batch)]  # fmt: skip
        start = time.perf_counter()
        with torch.inference_mode():
            for inputs in batches:
                cap.model.generate(**inputs, **settings)
        return time.perf_counter() - start

    def beamcap(self, case: Case, samples: list[dict] | None = None, **kw) -> float:
        """The captioning DoFn on ``samples`` (default: one image each) gathered in batches of case.batch images and
        cut into calls as ``CaptionImages`` does (parsing included)."""
        self.captioner(case)
        config = self._config(case, **kw)
        dofn = CaptionDoFn(config, handle_failures=True, lifecycle=self.lifecycle)  # the model loaded once
        dofn.setup()
        if samples is None:
            samples = [{"text": "<__dj__image>", "images": [p]} for p in self.paths]
        place = GlobalWindows.windowed_value(None)
        start = time.perf_counter()
        for i in range(0, len(samples), case.batch):
            works = [
                parse_placed(s, config, place.timestamp, place.windows[0], place.pane_info)
                for s in samples[i : i + case.batch]
            ]
            for call in into_calls(works, config.gpu_batch_size):
                for _ in dofn.process(call):
                    pass
        return time.perf_counter() - start

    def inputs(self, case: Case) -> float:
        """beamcap's input path alone (parse, read, decode with draft mode, processor), no generate."""
        cap = self.captioner(case)
        config = self._config(case)
        place = GlobalWindows.windowed_value(None)
        start = time.perf_counter()
        for i in range(0, len(self.paths), case.batch):
            works = [parse_placed({"text": "<__dj__image>", "images": [p]}, config, place.timestamp, place.windows[0],
                                  place.pane_info) for p in self.paths[i : i + case.batch]]  # fmt: skip
            for work in works:
                load_images(work, config, cap.input_size)
            cap.prepare([image for work in works for image in work.images.values()], None)
        return time.perf_counter() - start

    def reference(self, case: Case) -> float:
        """Data-Juicer's way: per call, images decoded inline, sub-batches of gpu_batch_size,
        the processor per sub-batch, a full generate per candidate."""
        cap, group = self.reference_captioner(case), case.samples_per_call or case.batch
        settings = dict(self._settings(case), num_return_sequences=1)
        start = time.perf_counter()
        for i in range(0, len(self.paths), group):
            images = [decode(p) for p in self.paths[i : i + group]]
            for j in range(0, len(images), case.batch):
                inputs = cap.prepare(images[j : j + case.batch], None)
                for _ in range(case.caption_num):
                    with torch.inference_mode():
                        cap.family.decode(cap.model.generate(**inputs, **settings), 0)
        return time.perf_counter() - start

    def runinference(self, case: Case) -> float:
        handler = CaptionHandler(self._config(case), self._settings(case), loaded=self.captioner(case))
        model = handler.load_model()
        start = time.perf_counter()
        for i in range(0, len(self.paths), case.batch):
            handler.run_inference([decode(p) for p in self.paths[i : i + case.batch]], model)
        return time.perf_counter() - start

    def beamcap_pipeline(self, case: Case) -> tuple[float, int]:
        samples = [{"text": "<__dj__image>", "images": [p]} for p in self.paths]
        start = time.perf_counter()
        p = beam.Pipeline()
        _ = p | beam.Create(samples) | CaptionImages.from_config(self._config(case, min_batch_size=case.batch))
        result = p.run()
        result.wait_until_finish()
        loads = sum(c.committed for c in result.metrics().query(
            MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name("model_loads"))["counters"])  # fmt: skip
        return time.perf_counter() - start, loads

    def runinference_pipeline(self, case: Case) -> tuple[float, int]:
        handler = CaptionHandler(self._config(case), self._settings(case)).with_batch(case.batch)
        start = time.perf_counter()
        p = beam.Pipeline()
        _ = p | beam.Create(self.paths) | beam.Map(decode) | RunInference(handler)
        result = p.run()
        result.wait_until_finish()
        loads = sum(d.committed.count for d in result.metrics().query(
            MetricsFilter().with_name("load_model_latency_milli_secs"))["distributions"])  # fmt: skip
        return time.perf_counter() - start, loads


PROMPTS = ["a photo of", "a picture of", "a close-up photograph, taken outdoors on a sunny day, of", "an image of"]


class PromptBench:
    """Mixed prompts (``prompt_key``, four prompts of different token lengths, in random order).

    A batch is split into one ``generate`` call per prompt (prompts are never
    mixed), so no call pads a prompt; what matters is how full the calls are.

    - arrival: the DoFn on batches in arrival order: several small calls per batch;
    - ordered: the same samples ordered by prompt first, as ``CaptionImages``
      batches them (``OrderByPrompt``): full calls;
    - reference: Data-Juicer's way, all prompts of a sub-batch in one call,
      padded (on the right, for BLIP: the padded prompts' captions degrade).
    """

    def __init__(self, bench: Bench):
        self.bench = bench
        rng = random.Random(0)
        self.samples = [{"text": "<__dj__image>", "images": [p], "prompt": rng.choice(PROMPTS)} for p in bench.paths]

    def arrival(self, case: Case) -> float:
        return self.bench.beamcap(case, self.samples, prompt_key="prompt")

    def ordered(self, case: Case) -> float:
        return self.bench.beamcap(case, sorted(self.samples, key=lambda s: s["prompt"]), prompt_key="prompt")

    def reference(self, case: Case) -> float:
        cap = self.bench.reference_captioner(case)
        settings = dict(self.bench._settings(case), num_return_sequences=1)
        start = time.perf_counter()
        for i in range(0, len(self.samples), case.batch):
            part = self.samples[i : i + case.batch]
            images = [decode(s["images"][0]) for s in part]
            prompts = [s["prompt"] for s in part]
            processor = cap.family.processor
            inputs = cap.on_device(processor(images=images, text=prompts, return_tensors="pt", padding=True))
            for _ in range(case.caption_num):
                with torch.inference_mode():
                    cap.family.decode(cap.model.generate(**inputs, **settings), 0)
        return time.perf_counter() - start

    def calls_per_batch(self, case: Case, sort: bool) -> float:
        samples = sorted(self.samples, key=lambda s: s["prompt"]) if sort else self.samples
        batches = [samples[i : i + case.batch] for i in range(0, len(samples), case.batch)]
        return sum(len({s["prompt"] for s in b}) for b in batches) / len(batches)


def report_prompts(bench: Bench, cases: list[Case], repeats: int, n: int) -> None:
    prompts = PromptBench(bench)
    print("\nmixed prompts (prompt_key; 4 prompts of different lengths, random order):\n")
    print(
        "| case | arrival order img/s (calls/batch) | ordered by prompt img/s (calls/batch) | reference (padded) img/s "
        "| ordered/arrival | ordered/reference |"
    )
    print("|---|---|---|---|---|---|")
    methods = {"arrival": prompts.arrival, "ordered": prompts.ordered, "reference": prompts.reference}
    for case in cases:
        prompts.ordered(case)  # warm-up
        rate: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():  # interleaved
                rate[name].append(n / fn(case))
        cell = {k: "{:.2f} ({:.2f}-{:.2f})".format(*median_spread(v)) for k, v in rate.items()}
        ratio = {
            k: "{:.2f}x ({:.2f}-{:.2f})".format(
                *median_spread([a / b for a, b in zip(rate["ordered"], rate[k], strict=True)])
            )
            for k in ("arrival", "reference")
        }
        print(
            f"| {case.label()} | {cell['arrival']}; {prompts.calls_per_batch(case, False):.1f} "
            f"| {cell['ordered']}; {prompts.calls_per_batch(case, True):.1f} | {cell['reference']} "
            f"| {ratio['arrival']} | {ratio['reference']} |",
            flush=True,
        )


def report_gpu_busy(bench: Bench, cases: list[Case]) -> None:
    """nvidia-smi utilisation while beamcap's steady state runs each case (GPU machines only)."""
    print(f"\nGPU busy during beamcap's steady state (nvidia-smi utilization.gpu, dtype {bench.dtype_name()}):")
    for case in cases:
        with GpuBusy(torch.cuda.current_device()) as busy:
            bench.beamcap(case)
        mean = "n/a (no nvidia-smi)" if busy.mean is None else f"{busy.mean:.0f}% over {len(busy.samples)} samples"
        print(f"- {case.label()}: {mean}", flush=True)


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


FLOORS = ("float32", "bfloat16")
"""The floors measured in every run: plain ``model.generate`` with the model in each of these dtypes."""


def measure(bench: Bench, case: Case, repeats: int) -> dict[str, list[float]]:
    methods: dict[str, Callable[[Case], float]] = {
        **{f"floor {dtype}": functools.partial(bench.floor, dtype=dtype) for dtype in FLOORS},
        "beamcap": bench.beamcap, "reference": bench.reference, "runinference": bench.runinference,
        "inputs": bench.inputs,
    }  # fmt: skip
    bench.beamcap(case)  # warm-up (allocator, lazy imports)
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for repeat in range(repeats):
        # interleaved, so drift hits every method alike; the order rotates, so no method always follows another
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            times[name].append(methods[name](case))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the demo model")
    mode.add_argument("--chat", action="store_true", help="a tiny chat model (LLaVA: CLIP + Llama, random weights)")
    mode.add_argument(
        "--chat-base",
        action="store_true",
        help="a chat model (LLaVA) with LLaVA-1.5's 576 image tokens and a small Llama, random weights (slow on CPU)",
    )
    mode.add_argument("--smoke", action="store_true", help="tiny: a few seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", action="store_true", help="BLIP-base mode: also 128 new tokens (slow on CPU)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="default: beamcap's (bf16/fp16 on CUDA)",
    )
    parser.add_argument(
        "--prompts", action="store_true", help="also mixed prompts: beamcap vs prompt-sorted vs the reference"
    )
    parser.add_argument(
        "--reference_dtype",
        default="float32",
        help="the dtype the reference's method runs the model in (as Data-Juicer)",
    )
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "beamcap-bench"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    os.makedirs(args.cache, exist_ok=True)
    if args.chat:
        from beamcap.testing.models import build_llava

        folder = os.path.join(args.cache, "tiny-llava")
        model = folder if os.path.exists(os.path.join(folder, "config.json")) else build_llava(folder)
        extra = {"min_new_tokens": 0}
        cases = [Case(1, 8, 16), Case(4, 8, 16)]
        n = args.images or 32
    elif args.chat_base:
        model, extra = build_llava_base(os.path.join(args.cache, "llava-576-random")), {"min_new_tokens": 0}
        cases = [Case(1, 8, 16), Case(4, 8, 16)]
        n = args.images or 8
    elif args.smoke or args.quick:
        model, extra = demo_model_path(), {}
        cases = [Case(1, 4, 4), Case(2, 4, 4)] if args.smoke else [
            Case(1, 8, 16), Case(4, 8, 16), Case(1, 8, 16, samples_per_call=10)]  # fmt: skip
        n = args.images or (8 if args.smoke else 64)
    else:
        model, extra = build_blip_base(os.path.join(args.cache, "blip-base-random")), {"min_new_tokens": 0}
        cases = [Case(1, 8, 16), Case(4, 8, 16), Case(1, 8, 16, samples_per_call=10)]
        if args.long:
            cases += [Case(1, 8, 128), Case(4, 8, 128)]
        n = args.images or 16
    repeats = 1 if args.smoke else args.repeats
    image_dir = os.path.join(args.cache, f"images-{n}")
    os.makedirs(image_dir, exist_ok=True)
    bench = Bench(model, make_images(image_dir, n), extra, args.dtype, args.reference_dtype)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    label = (
        "smoke" if args.smoke else "quick" if args.quick else "chat (tiny LLaVA)" if args.chat
        else "chat (LLaVA, 576 image tokens)" if args.chat_base else "BLIP-base"
    )  # fmt: skip
    print(
        f"# beamcap benchmark: {label}, {n} images "
        f"640x480, {repeats} repeats, {device}, torch {torch.__version__}, Python {platform.python_version()}"
    )
    bench.captioner(cases[0])  # load once, before timing
    print(
        f"model: {model} ({bench.dtype_name()} on {bench.captioner(cases[0]).info()['device']}; "
        f"the reference's method in {bench.reference_captioner(cases[0]).info()['dtype']})\n"
    )
    floors = [f"floor {dtype}" for dtype in FLOORS]
    compared = [*floors, "reference", "runinference"]  # beamcap's rate over each of these
    columns = [*floors, "beamcap", "reference", "runinference"]  # the rates, in the table's order
    names = {"beamcap": "beamcap", "reference": "reference", "runinference": "RunInference",
             **{f"floor {d}": f"{d} floor" for d in FLOORS}}  # fmt: skip
    header = [f"{names[k]} img/s" for k in columns] + [f"beamcap/{names[k]}" for k in compared]
    print("| case | " + " | ".join(header) + " |")
    print("|---" * (1 + len(header)) + "|")
    shares = []
    for case in cases:
        times = measure(bench, case, repeats)
        rate = {k: [n / t for t in v] for k, v in times.items()}
        med = {k: median_spread(v) for k, v in rate.items()}
        ratio = {k: median_spread([a / b for a, b in zip(rate["beamcap"], rate[k], strict=True)])
                 for k in compared}  # fmt: skip
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in (med[k] for k in columns)]
        cells += [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in ratio.values()]
        print(f"| {case.label()} | " + " | ".join(cells) + " |", flush=True)
        shares.append((case, median_spread([a / b for a, b in zip(times["inputs"], times["beamcap"], strict=True)])))
    print("\nbeamcap's input path (read, decode, processor) as a share of its steady-state time:")
    for case, (m, lo, hi) in shares:
        print(f"- {case.label()}: input share {m:.1%} ({lo:.1%}-{hi:.1%})")
    if args.prompts and not (args.chat or args.chat_base):
        report_prompts(bench, [c for c in cases if c.samples_per_call is None and c.batch > 1], repeats, n)
    if torch.cuda.is_available():
        report_gpu_busy(bench, cases)
    case = cases[0]
    bc_wall, bc_loads = bench.beamcap_pipeline(case)
    ri_wall, ri_loads = bench.runinference_pipeline(case)
    print(
        f"\nwhole pipelines on DirectRunner ({case.label()}, start and model load included): "
        f"beamcap {bc_wall:.1f} s ({n / bc_wall:.2f} img/s, model loaded {bc_loads}x), "
        f"RunInference {ri_wall:.1f} s ({n / ri_wall:.2f} img/s, model loaded {ri_loads}x)"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the benchmark process: {peak:.0f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
