"""Peak memory of one quantize() run on a randomly initialised, LLaVA-1.5-7B-*shaped* model.

Why: no GPU has been lent to this project, so the 7B/13B memory figures are extrapolated from a
run that keeps LLaVA-1.5-7B's layer widths (vision CLIP-L: 1024/4096, 336 px in 14 px patches =
576 image tokens; decoder: 4096/11008, 32 heads, 32,064-word vocabulary) but only a few layers.
Every quantity the pipeline holds is either per model (embeddings, lm_head), per layer (weights,
packed codes) or per calibration token (cached activations), so two runs with different decoder
depths give the per-layer slope to extrapolate to 32 (7B) or 40 (13B) layers.

It samples the process's resident memory every 10 ms (CPU, float32) and reports the peak during
quantize() as a multiple of the FP weight bytes, for the pipeline as it is ("shared": the working
copy shares the FP tensors, decoder layers are packed as they finish, VEO runs in micro-batches with
activation checkpointing) and, with ``--compare``, for the former design ("deepcopy": a full copy,
weights decoded until the end, VEO on whole batches).

    python benchmarks/memory_scaled.py --layers 1 2 [--compare] [--json benchmarks/results/memory_scaled.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _build(layers: int, vision_layers: int, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
           vision_hidden: int = 1024, vision_intermediate: int = 4096, vision_heads: int = 16):
    """A random LlavaForConditionalGeneration; the defaults are LLaVA-1.5-7B's widths (CLIP-L at 336 px)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from qvlm.models import build_layer_map
    from qvlm.models.loader import VLMHandle
    from training.tiny_llava import CHAT_TEMPLATE, IMAGE, build_tokenizer

    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=336,
                              patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return VLMHandle(model=model, processor=processor, layer_map=build_layer_map(model), name=f"llava-shaped-{hidden}x{layers}",
                     source="local")


def use_full_copy() -> None:
    """Make every later quantize() work on ``copy.deepcopy`` of the FP model (the former design).

    The copy is made by ``QuantRun.prepare`` (``qvlm/quant/run.py``) through the name
    ``working_copy`` it imports; that is the name to replace. Fails loudly if the run stops making
    its copy there, so ``--compare`` never measures the shared copy twice under two labels.
    """
    from qvlm.quant import run

    if not callable(getattr(run, "working_copy", None)):
        raise RuntimeError("qvlm/quant/run.py no longer makes the working copy through `working_copy`; "
                           "update use_full_copy() in benchmarks/memory_scaled.py")
    run.working_copy = copy.deepcopy


def measure(layers: int, vision_layers: int, design: str, calib: int, micro: int | None) -> dict:
    import torch

    from qvlm.quant import QuantConfig, quantize
    from qvlm.quant.working_copy import shared_bytes

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    handle = _build(layers, vision_layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in handle.model.parameters())
    if design == "deepcopy":
        use_full_copy()
    shared = design == "shared"
    # "shared": the large-model settings (micro-batches + checkpointing in VEO); "deepcopy": as before.
    cfg = QuantConfig(recipe="qvlm", w_bits=4, a_bits=4, calib_size=calib, calib_batch=calib, veo_epochs=1,
                      veo_micro_batch=micro if shared else None, veo_checkpoint=shared,
                      percentiles=[1.0, 0.99], max_block_depth=2, pack_weights=shared)
    base = _rss()
    peak = [base]
    stage = ["start"]
    by_stage: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _rss()
            peak[0] = max(peak[0], now)
            by_stage[stage[0]] = max(by_stage.get(stage[0], 0), now - base)
            time.sleep(0.01)

    def progress(name: str, fraction: float, message: str) -> None:
        stage[0] = name

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    result = quantize(handle, cfg, progress=progress)
    seconds = time.perf_counter() - t
    done.set()
    thread.join()
    return {"layers": layers, "vision_layers": vision_layers, "design": design, "calib_pairs": calib,
            "veo_micro_batch": micro, "fp_weight_bytes": weight_bytes, "peak_extra_bytes": peak[0] - base,
            "peak_extra_over_weights": round((peak[0] - base) / weight_bytes, 3), "seconds": round(seconds, 1),
            "kept_after_bytes": _rss() - base, "blocks": result.blocks,
            "shared_with_fp_after_bytes": shared_bytes(handle.model, result.handle.model),
            "peak_extra_bytes_by_stage": by_stage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--calib", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="also measure the former deepcopy design")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one (layers, design) and print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.vision_layers, args.one[1], args.calib, args.micro)))
        return
    rows = []
    for design in ["shared"] + (["deepcopy"] if args.compare else []):
        for layers in args.layers:  # one process per run: RSS peaks do not leak between runs
            out = subprocess.run([sys.executable, __file__, "--one", str(layers), design, "--calib", str(args.calib),
                                  "--micro", str(args.micro), "--vision-layers", str(args.vision_layers)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{design:8s} layers={layers}: FP weights {r['fp_weight_bytes'] / 2**30:.2f} GiB, peak extra "
                  f"{r['peak_extra_bytes'] / 2**30:.2f} GiB ({r['peak_extra_over_weights']}x), shared with FP after "
                  f"{r['shared_with_fp_after_bytes'] / 2**30:.2f} GiB, {r['seconds']} s",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
