"""The layer map: which ``nn.Linear`` of a LLaVA-family model plays which role, per layer.

Quantizers, calibration hooks, entropy and the block search all walk this map, so the
differences between model families (CLIP vs SigLIP towers, Llama vs Qwen2 vs Mistral
decoders, where the projector and the LLM's final norm sit) live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

from torch import nn

Tower = Literal["vision", "language"]

# Role name -> attribute path inside one transformer layer, per layer style. The first
# matching style wins; every role of a style must exist for it to match.
VISION_STYLES: dict[str, dict[str, str]] = {
    # CLIP and SigLIP encoder layers share these names in transformers.
    "clip": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    },
}
LANGUAGE_STYLES: dict[str, dict[str, str]] = {
    # Llama, Mistral, Qwen2, Vicuna: the gated-MLP decoder layer.
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
}

NORM_SITES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "clip": (("layer_norm1", ("q", "k", "v")), ("layer_norm2", ("fc1",))),
    "llama": (("input_layernorm", ("q", "k", "v")), ("post_attention_layernorm", ("gate", "up"))),
}
"""Per layer style: each norm of a layer (its attribute path) and the roles of the Linears that read its output.
Read by the RepQ-ViT fold (which folds a range into a LayerNorm) and by CDM (the norm the next layer applies first)."""


@dataclass
class LayerEntry:
    """One transformer layer: its module, its index within its tower and its Linears by role."""

    tower: Tower
    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear]
    linear_names: dict[str, str] = field(default_factory=dict)
    norms: tuple[tuple[nn.Module, tuple[str, ...]], ...] = ()
    """Each norm of the layer that exists (:data:`NORM_SITES`) with the roles of the Linears reading its output."""

    def __iter__(self) -> Iterator[tuple[str, nn.Linear]]:
        return iter(self.linears.items())

    def norm_before(self, role: str) -> nn.Module | None:
        """The norm whose output the Linear ``role`` reads (the layer's input norm for "q"), or None."""
        return next((norm for norm, roles in self.norms if role in roles), None)


@dataclass
class LayerMap:
    """Every quantizable layer of a VLM, bottom-up per tower, plus the modules between and after them."""

    vision: list[LayerEntry]
    language: list[LayerEntry]
    vision_style: str
    language_style: str
    projector: nn.Module
    """The multimodal projector: vision features in, the image tokens the LLM sees out."""
    projector_name: str
    """The projector's qualified name in the model (the prefix of its Linears' names)."""
    final_norm: nn.Module
    """The LLM's norm after its last decoder layer (its output X^(n) is what lm_head reads)."""

    def layers(self, tower: Tower | None = None) -> list[LayerEntry]:
        if tower == "vision":
            return self.vision
        if tower == "language":
            return self.language
        return [*self.vision, *self.language]

    def linears(self, tower: Tower | None = None) -> Iterator[tuple[str, nn.Linear]]:
        """(qualified module name, Linear) for every mapped Linear."""
        for layer in self.layers(tower):
            for role, module in layer.linears.items():
                yield layer.linear_names[role], module


def _resolve(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _is_linear(module: nn.Module | None) -> bool:
    """nn.Linear, or a stand-in that computes one (packed low-bit layers): duck-typed on its sizes."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def _match_style(layer: nn.Module, styles: dict[str, dict[str, str]]) -> str | None:
    for style, roles in styles.items():
        if all(_is_linear(_resolve(layer, p)) for p in roles.values()):
            return style
    return None


def _find_layer_list(root: nn.Module, styles: dict[str, dict[str, str]]) -> tuple[str, nn.ModuleList, str]:
    """The ModuleList under ``root`` whose items all match one layer style (the deepest such list wins ties)."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            style = _match_style(module[0], styles)
            if style and all(_match_style(m, styles) == style for m in module):
                return name, module, style
    raise ValueError(f"no stack of transformer layers with known Linear roles under {type(root).__name__}")


def _entries(tower: Tower, prefix: str, layers: nn.ModuleList, style: str,
             styles: dict[str, dict[str, str]]) -> list[LayerEntry]:
    roles, entries = styles[style], []
    for i, layer in enumerate(layers):
        linears = {role: _resolve(layer, path) for role, path in roles.items()}
        names = {role: f"{prefix}.{i}.{path}" for role, path in roles.items()}
        norms = tuple((norm, readers) for path, readers in NORM_SITES.get(style, ())
                      if (norm := _resolve(layer, path)) is not None)
        entries.append(LayerEntry(tower, i, f"{prefix}.{i}", layer, linears, names, norms))  # type: ignore[arg-type]
    return entries


def core_model(model: nn.Module) -> nn.Module:
    """The module holding ``vision_tower``/``multi_modal_projector``/``language_model``.

    transformers 5 nests them under ``model.model`` (``LlavaForConditionalGeneration.model``) and
    keeps ``lm_head`` outside; a bare ``LlavaModel`` is its own core.
    """
    return getattr(model, "model", model)


def build_layer_map(model: nn.Module) -> LayerMap:
    """Map a LLaVA-family model; raises ValueError naming what is missing for an unknown layout."""
    core = core_model(model)
    vision_tower = getattr(core, "vision_tower", None)
    language_model = getattr(core, "language_model", None)
    if vision_tower is None or language_model is None:
        raise ValueError(
            f"{type(model).__name__} has no vision_tower/language_model: not a LLaVA-family model"
        )
    projector = getattr(core, "multi_modal_projector", None)
    if not isinstance(projector, nn.Module):
        raise ValueError(f"{type(model).__name__} has no multi_modal_projector: not a LLaVA-family model")
    final_norm = getattr(language_model, "norm", None)
    if not isinstance(final_norm, nn.Module):
        raise ValueError(f"{type(model).__name__}'s language model has no final norm (language_model.norm)")
    v_name, v_layers, v_style = _find_layer_list(vision_tower, VISION_STYLES)
    l_name, l_layers, l_style = _find_layer_list(language_model, LANGUAGE_STYLES)
    base = "model." if core is not model else ""
    vision = _entries("vision", f"{base}vision_tower.{v_name}", v_layers, v_style, VISION_STYLES)
    language = _entries("language", f"{base}language_model.{l_name}", l_layers, l_style, LANGUAGE_STYLES)
    return LayerMap(vision, language, v_style, l_style, projector, f"{base}multi_modal_projector", final_norm)
