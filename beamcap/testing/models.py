"""Tiny random-weight models of each image-to-text family, built offline (tests and benchmarks).

Each builder writes a folder with ``save_pretrained`` (model + processor or
image processor + tokenizer), so tests load it back through the same code
path as a hub model. Weights are random: captions are the same for every
image, which is fine for format and count tests (routing tests use the
trained demo model).
"""

from __future__ import annotations

import os

import torch
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    GPT2Config,
    GPT2Tokenizer,
    T5Tokenizer,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = (
    "a an the photo picture of with and is on in cat dog red blue green yellow circle square "
    "triangle one two three big small women man umbrella describe this image caption"
).split()
IMAGE_SIZE = 32
_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
)


def bert_tokenizer() -> BertTokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizer(vocab=vocab)


def gpt2_tokenizer() -> GPT2Tokenizer:
    """A byte-level BPE with no merges: every byte is a token."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=[])
    tok.pad_token = tok.eos_token
    return tok


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _save(model, processors, path: str) -> str:
    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    for p in processors:
        p.save_pretrained(path)
    return path


def _text(vocab_size: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **extra,
    )


def build_blip(path: str) -> str:
    tok = bert_tokenizer()
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=_VISION,
        text_config=_text(
            len(tok),
            bos_token_id=tok.cls_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
        ),
        projection_dim=32,
    )
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(BlipForConditionalGeneration(config), [BlipProcessor(image_processor, tok)], path)


def _blip2(path: str, tok, text_config: dict) -> str:
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tok, num_query_tokens=4)
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=_VISION,
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            vocab_size=64,
        ),
        text_config=text_config,
        num_query_tokens=4,
        image_token_index=processor.tokenizer.convert_tokens_to_ids(str(processor.image_token)),
    )
    model = Blip2ForConditionalGeneration(config)
    model.resize_token_embeddings(len(processor.tokenizer))
    return _save(model, [processor], path)


def build_blip2_opt(path: str) -> str:
    tok = gpt2_tokenizer()
    text = _text(
        len(tok) + 1,
        model_type="opt",
        ffn_dim=64,
        word_embed_proj_dim=32,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    text.pop("intermediate_size")
    return _blip2(path, tok, text)


def build_blip2_t5(path: str) -> str:
    tok = t5_tokenizer()
    text = dict(
        model_type="t5",
        vocab_size=len(tok) + 1,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,
        bos_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _blip2(path, tok, text)


def build_git(path: str) -> str:
    tok = bert_tokenizer()
    torch.manual_seed(0)
    config = GitConfig(
        vision_config=dict(_VISION, projection_dim=32),
        **_text(len(tok), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return _save(GitForCausalLM(config), [GitProcessor(image_processor, tok)], path)


def build_vision_encoder_decoder(path: str) -> str:
    tok = gpt2_tokenizer()
    encoder = ViTConfig(**{k: v for k, v in _VISION.items()})
    decoder = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        add_cross_attention=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(VisionEncoderDecoderModel(config), [image_processor, tok], path)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_llava(
    path: str, image_size: int = IMAGE_SIZE, patch_size: int = 8, vision: dict | None = None, text: dict | None = None
) -> str:
    """A chat model: CLIP vision + Llama, byte-level tokenizer with <image>, a hand-written chat template.

    Tiny by default; ``image_size``, ``patch_size`` and the ``vision`` / ``text`` config overrides let the
    benchmark build one with a real image-token count (576 at 336 px and patch 14, as LLaVA-1.5).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = gpt2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    )
    image_token = tok.convert_tokens_to_ids("<image>")
    text_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **{**_VISION, "image_size": image_size, "patch_size": patch_size, **(vision or {})}, projection_dim=32
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **{**text_config, **(text or {})},
        ),
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return _save(LlavaForConditionalGeneration(config), [processor], path)


def build_florence2(path: str) -> str:
    """A task-prompt model: Florence-2 (DaViT vision + BART), a byte-level tokenizer with <image>."""
    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *chars])}
    tok = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(
        size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=False
    )
    image_processor.image_seq_length = 5  # (64 / 32)^2 patches + 1 pooled token
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    vision = dict(
        depths=[1, 1, 1, 1],
        embed_dim=[16, 16, 32, 32],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    text = dict(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=tok.bos_token_id,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id)
    torch.manual_seed(0)
    return _save(Florence2ForConditionalGeneration(config), [processor], path)


BUILDERS = {
    "blip": build_blip,
    "blip2_opt": build_blip2_opt,
    "blip2_t5": build_blip2_t5,
    "git": build_git,
    "vision_encoder_decoder": build_vision_encoder_decoder,
    "llava": build_llava,
    "florence2": build_florence2,
}
"""One tiny model builder per tested family: ``BUILDERS[name](folder) -> folder``."""
