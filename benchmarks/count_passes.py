"""Count decoder/vision layer forward passes (in calibration-set equivalents) of one quantize() run.

Why: the time of a Q-VLM run on a large model is, to first order, (layer passes) x (FLOPs of one
layer pass over the calibration set). The passes depend only on the recipe and the config, not on
the model's width, so counting them on the bundled model and multiplying by a LLaVA-1.5-7B/13B
layer's FLOPs gives the compute of a 7B/13B run (see the scale section of benchmarks/README.md).

    python benchmarks/count_passes.py [--bits w4a4] [--recipe qvlm[,rtn,...]]

Prints one JSON report per recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.cli import add_recipe_option, recipe_list  # noqa: E402
from qvlm.models import load_vlm  # noqa: E402
from qvlm.quant import QuantConfig, quantize  # noqa: E402
from qvlm.quant.calibration import calibration_batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a4")
    add_recipe_option(ap, "qvlm", "comma-separated recipes, one report each")
    ap.add_argument("--calib-size", type=int, default=64)
    args = ap.parse_args()
    try:
        recipes = recipe_list(args.recipe)
    except ValueError as err:
        ap.error(str(err))
    handle = load_vlm("bundled")
    tokens: Counter = Counter()
    grads: Counter = Counter()

    def counter(tower: str, index: int):
        def hook(module, inputs, output):
            hidden = inputs[0] if inputs else None
            if isinstance(hidden, torch.Tensor):
                tokens[(tower, index)] += hidden.shape[0] * hidden.shape[1]
                if torch.is_grad_enabled():
                    grads[(tower, index)] += hidden.shape[0] * hidden.shape[1]
        return hook

    for tower, layers in (("vision", handle.layer_map.vision), ("language", handle.layer_map.language)):
        for i, layer in enumerate(layers):
            layer.module.register_forward_hook(counter(tower, i))
    for recipe in recipes:
        tokens.clear()
        grads.clear()
        cfg = QuantConfig.from_bits(args.bits, recipe=recipe, calib_size=args.calib_size)
        result = quantize(handle, cfg)
        # one pass = every calibration sample once, padded as the pipeline pads it
        batches = calibration_batches(handle, cfg.calib_size, cfg.calib_seed, cfg.calib_batch)
        per_pass = {"language": sum(b.input_ids.numel() for b in batches),
                    "vision": cfg.calib_size * (handle.model.config.vision_config.image_size
                                                // handle.model.config.vision_config.patch_size) ** 2}
        passes = {f"{t}{i}": round(v / per_pass[t], 2) for (t, i), v in sorted(tokens.items())}
        grad_passes = {f"{t}{i}": round(v / per_pass[t], 2) for (t, i), v in sorted(grads.items())}
        report = {"passes": passes, "grad_passes": grad_passes, "recipe": recipe, "bits": args.bits,
                  "calib_size": args.calib_size, "timings": result.timings, "blocks": result.blocks}
        print(json.dumps(report, indent=1))

if __name__ == "__main__":
    main()
