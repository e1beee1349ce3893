"""Tiny randomly initialised models of every supported LLaVA family, saved as real model folders.

Built from configs in the test code (no hub), with the project's word-level tokenizer and
the family's own processor classes, so the folders load through ``qvlm.models.load_vlm``
exactly like a downloaded checkpoint would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from training.tiny_llava import CHAT_TEMPLATE, IMAGE, build_tokenizer

FAMILIES = ("llava-clip-llama", "llava-siglip-qwen2", "llava-siglip-mistral", "llava-next-clip-llama")
IMAGE_SIZE, PATCH = 32, 8


def _text_config(kind: str, vocab: int, tok) -> object:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**common)


def _vision(kind: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if kind == "clip":
        return CLIPVisionConfig(**common), CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return SiglipVisionConfig(**common), SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """Write a random model of ``family`` with its processor to ``out`` and return the folder."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE)
    vision_kind = "siglip" if "siglip" in family else "clip"
    text_kind = family.rsplit("-", 1)[-1]
    vision, image_processor = _vision(vision_kind)
    text = _text_config(text_kind, len(tok), tok)
    # CLIP has a CLS token that the "default" strategy drops; SigLIP has none, so it keeps all ("full").
    strategy, extra = ("default", 1) if vision_kind == "clip" else ("full", 0)
    if family.startswith("llava-next"):
        pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                 vision_feature_select_strategy=strategy, vision_feature_layer=-1,
                                 image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                       vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                       num_additional_image_tokens=extra)
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                             vision_feature_select_strategy=strategy, vision_feature_layer=-1,
                             image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                   num_additional_image_tokens=extra)
    return _save(model, processor, tok, out)


def _save(model, processor, tok, out: Path) -> Path:
    """Write a built model with its processor; generation stops and pads with the word tokenizer's ids."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_hub_shaped(hub_id: str, out: Path, *, vision_layers: int = 2, text_layers: int = 1,
                     image_size: int = 28, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A random model with ``hub_id``'s real widths (:data:`hub_configs.HUB_CONFIGS`: hidden and
    intermediate sizes, heads, kv heads, so head_dim too; patch size, feature layer, strategy,
    projector activation), its depth cut to ``vision_layers`` / ``text_layers``, ``image_size``
    pixels (patch 14: 28 px gives 2x2 patches) and the project's word-level vocabulary (``vocab_size``
    widens the embedding and output tables to a hub model's row count; the tokenizer still uses the first rows).

    The widths are what the quantizers see (SigLIP-so400m's 4304, Qwen2's 896 with 64-wide heads,
    Mistral's 8 kv heads, 13B's 5120 / 13824); depth, image size and vocabulary only cost time.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from tests.hub_configs import HUB_CONFIGS

    spec = HUB_CONFIGS[hub_id]
    torch.manual_seed(seed)
    tok = build_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE)
    v = {k: val for k, val in spec["vision_config"].items() if k != "model_type"}
    v.update(num_hidden_layers=vision_layers, image_size=image_size)
    t = {k: val for k, val in spec["text_config"].items() if k != "model_type"}
    n_positions = max(512, (image_size // spec["vision_config"]["patch_size"]) ** 2 + 256)  # the image + a question
    t.update(num_hidden_layers=text_layers, vocab_size=vocab_size or len(tok), max_position_embeddings=n_positions,
             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clip = spec["vision_config"]["model_type"] == "clip_vision_model"
    vision = CLIPVisionConfig(**v) if clip else SiglipVisionConfig(**v)
    text = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[spec["text_config"]["model_type"]](**t)
    strategy = spec["vision_feature_select_strategy"]
    extra_tokens = 1 if clip else 0  # CLIP's CLS token, dropped by the "default" strategy
    patch = v["patch_size"]
    n_patches = (image_size // patch) ** 2
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token_id,
                  vision_feature_select_strategy=strategy, vision_feature_layer=spec["vision_feature_layer"],
                  projector_hidden_act=spec["projector_hidden_act"])
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size]]
    square = {"height": image_size, "width": image_size}
    if spec["model_type"] == "llava":
        config = LlavaConfig(**common, image_seq_length=n_patches)
        model = LlavaForConditionalGeneration(config)
        image_processor = (CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square) if clip
                           else SiglipImageProcessor(size=square))
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                   num_additional_image_tokens=extra_tokens)
    elif spec["model_type"] == "llava_next":
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size=square,
                                                  image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                       vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                       num_additional_image_tokens=extra_tokens)
    else:
        config = LlavaOnevisionConfig(**common, image_grid_pinpoints=pinpoints,
                                      vision_aspect_ratio=spec["vision_aspect_ratio"])
        model = LlavaOnevisionForConditionalGeneration(config)
        # transformers 5.24's LlavaOnevisionProcessor cannot be built without torchvision (it checks for a
        # video processor class); at these sizes the LLaVA-NeXT processor tiles the image and counts its
        # tokens (base + unpadded tiles + a newline per row) exactly as OneVision does, since anyres_max_9
        # only shrinks grids larger than 9 tiles.
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size=square,
                                                  image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                       vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                       num_additional_image_tokens=extra_tokens)
    return _save(model, processor, tok, out)
