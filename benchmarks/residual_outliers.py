"""Residual-stream outliers per decoder layer: max |h| / median |h| (the measure of Sun et al. 2024).

Massive activations (1,000x the median and more, in fixed channels) are one source of layers whose
quantization errors interact (``../shared/design/interacting-layers.md``); this says whether a model
has them. Prints one line per hidden state (embeddings, then each decoder layer's output)::

    python benchmarks/residual_outliers.py --model mosaic [--samples 16]
"""

from __future__ import annotations

import argparse

import torch

from qvlm.models import load_vlm
from qvlm.quant.calibration import calibration_batches


def residual_outliers(model_id: str, samples: int = 16, seed: int = 3) -> list[dict]:
    handle = load_vlm(model_id, device="cpu")
    batch = calibration_batches(handle, size=samples, seed=seed, batch_size=samples)[0]
    with torch.inference_mode():
        out = handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           pixel_values=batch.pixel_values, output_hidden_states=True)
    rows = []
    for index, hidden in enumerate(out.hidden_states):
        values = hidden[batch.valid].abs()  # real tokens only, not padding
        rows.append({"hidden_state": index, "max": values.max().item(), "median": values.median().item(),
                     "ratio": (values.max() / values.median()).item(), "top_channel": int(values.amax(0).argmax())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    for r in residual_outliers(args.model, args.samples):
        print(f"h{r['hidden_state']}: max {r['max']:.1f}  median {r['median']:.3f}  ratio {r['ratio']:.0f}  "
              f"top channel {r['top_channel']}")


if __name__ == "__main__":
    main()
