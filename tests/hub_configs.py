"""Architecture fields of the LLaVA-family hub checkpoints the app offers or the paper evaluates.

The tests cannot reach the hub, so these are the public ``config.json`` values, written down with
where each came from. Only the fields that shape the quantized Linears and the image path are kept;
:func:`families.build_hub_shaped` builds a random model with these *widths* and a cut depth.

Provenance, per field group (``source`` is the config.json each entry describes):

* CLIP ViT-L/14-336 towers (llava-1.5, llava-v1.6): hidden 1024, intermediate 4096, 24 layers,
  16 heads, image 336, patch 14. Also transformers' ``LlavaConfig`` default vision config, which was
  written from llava-1.5-7b-hf.
* SigLIP-so400m-patch14-384 towers (interleave, onevision): hidden 1152, intermediate 4304, 16
  heads, image 384, patch 14; 26 layers in the llava-hf conversions (the 27th is unused by
  ``vision_feature_layer=-1``). Also transformers' ``LlavaOnevisionConfig`` default vision config
  (checked in transformers 5.24: 1152 / 4304 / 26 layers).
* Vicuna-7B v1.5 (llava-1.5-7b, llava-v1.6-vicuna-7b): Llama-2-7B shapes 4096 / 11008, 32 layers,
  32 heads, 32 kv heads (Llama defaults; the hub config sets only vocab 32064 and max positions).
* Vicuna-13B v1.5 (llava-1.5-13b): Llama-2-13B shapes 5120 / 13824, 40 layers, 40 heads, 40 kv heads.
* Mistral-7B-Instruct-v0.2 (llava-v1.6-mistral-7b): 4096 / 14336, 32 layers, 32 heads, 8 kv heads.
* Qwen2-0.5B (interleave, onevision): 896 / 4864, 24 layers, 14 heads, 2 kv heads, tied input and
  output embeddings (the public Qwen/Qwen2-0.5B config.json; whether the llava-hf conversions keep
  the tie is not checked here, and the tied case is the one that needs the export's care).
* Projector, feature layer and strategy: the llava-hf model cards / configs; LLaVA-1.5 and v1.6 take
  the penultimate CLIP layer (-2) without its CLS token ("default"); the SigLIP models take the last
  layer (-1) and every token ("full"); every projector is linear-GELU-linear ("gelu").

Written from the public configs as remembered and cross-checked against transformers' defaults where
those exist; not fetched in this session (no hub access).
"""

from __future__ import annotations

HUB = "https://huggingface.co/{}/blob/main/config.json"

_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32}
_QWEN2_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}

HUB_CONFIGS: dict[str, dict] = {
    "llava-hf/llava-1.5-7b-hf": {
        "model_type": "llava", "vision_config": _CLIP_L_336, "text_config": _VICUNA_7B,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    },
    "llava-hf/llava-1.5-13b-hf": {
        "model_type": "llava", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
                        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    },
    "llava-hf/llava-interleave-qwen-0.5b-hf": {
        "model_type": "llava", "vision_config": _SIGLIP_SO400M, "text_config": _QWEN2_05B,
        "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
    },
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        "model_type": "llava_next", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    },
    "llava-hf/llava-v1.6-vicuna-7b-hf": {
        "model_type": "llava_next", "vision_config": _CLIP_L_336, "text_config": _VICUNA_7B,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    },
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": {
        "model_type": "llava_onevision", "vision_config": _SIGLIP_SO400M, "text_config": _QWEN2_05B,
        "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
    },
}
for _hub_id, _entry in HUB_CONFIGS.items():
    _entry["source"] = HUB.format(_hub_id)
