"""Train the demo captioner: a small BLIP, from scratch or from a previous stage, on procedural shape pictures.

The shipped model is trained in seven stages (``shapes.py`` describes the styles):

    # 1. from scratch on the 'train' style (the first release's recipe and pictures)
    python -m beamcap.demo.train --out /tmp/demo-stage1
    # 2. from stage 1 on the 'varied' style (15% 'train'), with an average of the weights
    python -m beamcap.demo.train --init /tmp/demo-stage1 --out /tmp/demo-stage2 \
        --style varied --train_share 0.15 --steps 9000 --ema 0.999
    # 3. from stage 2, longer, at half the learning rate, on another stream of pictures
    python -m beamcap.demo.train --init /tmp/demo-stage2 --out /tmp/demo-stage3 \
        --style varied --train_share 0.15 --steps 14000 --lr 5e-4 --seed 1 --ema 0.999
    # 4. from stage 3, at a lower learning rate still, on a third stream of pictures
    python -m beamcap.demo.train --init /tmp/demo-stage3 --out /tmp/demo-stage4 \
        --style varied --train_share 0.15 --steps 8000 --lr 3e-4 --seed 2 --ema 0.999
    # 5. from stage 4, seeing 128x128 pictures instead of 96x96 (position embeddings interpolated)
    python -m beamcap.demo.train --init /tmp/demo-stage4 --out /tmp/demo-stage5 --image_size 128 \
        --style varied --train_share 0.15 --steps 4500 --lr 4e-4 --seed 3 --ema 0.999
    # 6. from stage 5, on the 'harder' style, with the prompt words left out of the loss
    python -m beamcap.demo.train --init /tmp/demo-stage5 --out /tmp/demo-stage6 --mask_prompt \
        --style harder --train_share 0.15 --steps 4200 --lr 3e-4 --seed 5 --ema 0.999
    # 7. from stage 6, the same at a lower learning rate, on another stream of pictures
    python -m beamcap.demo.train --init /tmp/demo-stage6 --out beamcap/demo/model --mask_prompt \
        --style harder --train_share 0.15 --steps 3600 --lr 2e-4 --seed 6 --ema 0.999

    python -m beamcap.demo.train --out /tmp/m --steps 30          # a smoke run

The held-out style that ``evaluate.py`` measures on is never drawn here. The
shipped model's stage 2 started from the first release's weights, its stage 3
from the second release's, its stage 4 from the third release's, its stage 5
from the fourth release's, its stage 6 from the fifth release's, its stage 7
from the sixth release's.
Seeded and reproducible on the same machine and library versions (the weights
also depend on ``--threads``). The output is a ``save_pretrained`` folder
(model + processor), loaded like any hub model.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from beamcap.demo.shapes import PROMPTS, draw_scene, random_scene, vocabulary

TRAINING_STYLES = ("train", "varied", "harder")

_LOGGER = logging.getLogger(__name__)
IMAGE_SIZE = 96
PATCH_SIZE = 8  # 144 patches of 8x8 at 96x96 (stage 5 grows the input to 128x128: 256 patches)


def build_processor(image_size: int = IMAGE_SIZE) -> BlipProcessor:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(special + vocabulary())})
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor, tokenizer)


def resize_input(model: BlipForConditionalGeneration, image_size: int) -> None:
    """Make ``model`` see ``image_size`` pixels square: its patch position embeddings are interpolated (bicubic)."""
    vision = model.config.vision_config
    if image_size < vision.image_size or image_size % vision.patch_size:
        raise ValueError(
            f"image_size {image_size} must be a multiple of the patch size ({vision.patch_size}) and at least the "
            f"model's input size ({vision.image_size}): the input can grow, not shrink"
        )
    if image_size == vision.image_size:
        return
    embeddings = model.vision_model.embeddings
    grid = image_size // vision.patch_size
    with torch.no_grad():
        dummy = torch.zeros(1, grid * grid + 1, vision.hidden_size)
        resized = embeddings.interpolate_pos_encoding(dummy, image_size, image_size)
    embeddings.position_embedding = torch.nn.Parameter(resized.detach().clone())
    embeddings.num_patches, embeddings.num_positions = grid * grid, grid * grid + 1
    embeddings.image_size = vision.image_size = image_size
    _LOGGER.info("Input resized to %dx%d (%d patches)", image_size, image_size, grid * grid)


def build_model(processor: BlipProcessor, image_size: int = IMAGE_SIZE) -> BlipForConditionalGeneration:
    tok = processor.tokenizer
    config = BlipConfig(
        vision_config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=PATCH_SIZE,
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tok.cls_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
        ),
        projection_dim=128,
    )
    return BlipForConditionalGeneration(config)


def make_batch(
    processor: BlipProcessor,
    rng: random.Random,
    size: int,
    prompt_rate: float = 0.3,
    style: str = "train",
    train_share: float = 0.0,
    mask_prompt: bool = False,
):
    """``size`` pictures in ``style`` (a ``train_share`` of them in 'train' instead) and their captions.

    A ``prompt_rate`` of the captions follow one of :data:`PROMPTS`; with ``mask_prompt`` the prompt's words are
    left out of the loss (as BLIP's own fine-tuning does), so the model continues a prompt but never writes one.
    """
    images, texts, prompt_lengths = [], [], []
    for _ in range(size):
        scene = random_scene(rng)
        drawn = style if style == "train" or rng.random() >= train_share else "train"
        images.append(draw_scene(scene, rng, drawn))
        prefix = rng.choice(PROMPTS) + " " if rng.random() < prompt_rate else ""
        texts.append(prefix + scene.caption)
        prompt_lengths.append(len(processor.tokenizer.tokenize(prefix)))
    inputs = processor(images=images, text=texts, padding="longest", return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.tokenizer.pad_token_id, -100)
    if mask_prompt:
        for row, length in enumerate(prompt_lengths):
            labels[row, 1 : 1 + length] = -100  # position 0 is [CLS], the decoder's start token
    return inputs, labels


def train(
    out: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    init: str | None = None,
    style: str = "train",
    train_share: float = 0.0,
    ema: float = 0.0,
    save_every: int = 0,
    image_size: int | None = None,
    mask_prompt: bool = False,
) -> None:
    """Train ``steps`` steps from scratch, or from the model in ``init``, and save to ``out``.

    With ``ema`` (a decay such as 0.999), what is saved is the exponential moving average of the weights.
    With ``save_every``, the model is also saved to ``out`` every that many steps (each save replaces the last),
    so that a long run can be evaluated, or stopped, part way.
    With ``image_size``, the model sees pictures of that many pixels square (default: ``init``'s size, or
    ``IMAGE_SIZE`` from scratch); a model from ``init`` of a smaller size has its position embeddings interpolated
    (the input can grow, not shrink).
    With ``mask_prompt``, prompt words are left out of the loss (see :func:`make_batch`).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init:
        model = BlipForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        if image_size is None:
            image_size = model.config.vision_config.image_size
        resize_input(model, image_size)
        processor = build_processor(image_size)
        if model.config.text_config.vocab_size != len(processor.tokenizer):
            raise ValueError(f"{init} has a vocabulary of {model.config.text_config.vocab_size} words, not the demo's")
    else:
        image_size = IMAGE_SIZE if image_size is None else image_size
        processor = build_processor(image_size)
        model = build_model(processor, image_size)
    model.train()
    averaged = None
    if ema:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema)
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, labels = make_batch(
            processor, rng, batch_size, style=style, train_share=train_share, mask_prompt=mask_prompt
        )
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if averaged is not None:
            averaged.update_parameters(model)
        if step % 50 == 0 or step == steps:
            _LOGGER.info("step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - start)
        if save_every and step % save_every == 0 and step < steps:
            _save(averaged.module if averaged is not None else model, processor, out, f"step {step}")
    if averaged is not None:
        model = averaged.module
    model.eval()
    _save(model, processor, out, "the end")


def _save(model: BlipForConditionalGeneration, processor: BlipProcessor, out: str, when: str) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _LOGGER.info("Saved the demo model to %s (%s)", out, when)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to save the model and processor in")
    parser.add_argument("--init", default=None, help="continue from the model in this folder (default: from scratch)")
    parser.add_argument("--style", default="train", choices=TRAINING_STYLES, help="picture style to train on")
    parser.add_argument(
        "--train_share", type=float, default=0.0, help="share of the pictures drawn in 'train' style instead"
    )
    parser.add_argument("--ema", type=float, default=0.0, help="save a moving average of the weights with this decay")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch_size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_every", type=int, default=0, help="also save every this many steps (0: at the end)")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"picture side the model sees, a multiple of {PATCH_SIZE}, at least --init's (default: --init's, or {IMAGE_SIZE})",
    )
    parser.add_argument(
        "--mask_prompt",
        action="store_true",
        help="leave the prompt words ('a photo of', ...) out of the loss, so the model never writes them itself",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.save_every < 0:
        parser.error("--steps and --batch_size must be at least 1, --save_every at least 0")
    if args.image_size is not None and (args.image_size < PATCH_SIZE or args.image_size % PATCH_SIZE):
        parser.error(f"--image_size must be a positive multiple of {PATCH_SIZE}")
    if not 0.0 <= args.train_share <= 1.0 or not 0.0 <= args.ema < 1.0:
        parser.error("--train_share must be in [0, 1] and --ema in [0, 1)")
    if args.train_share and args.style == "train":
        parser.error("--train_share mixes 'train' pictures into another style: use it with --style varied or harder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train(
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.init,
        args.style,
        args.train_share,
        args.ema,
        args.save_every,
        args.image_size,
        args.mask_prompt,
    )


if __name__ == "__main__":
    main()
