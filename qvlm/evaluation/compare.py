"""How quantized variants differ from their FP model: token by token, question by question, bit by bit.

* :func:`token_comparison`: one image and question. Every model is teacher-forced on the FP
  model's greedy answer, so step j of every model predicts the same token; per step the top-k
  next-token probabilities, KL(FP‖variant) and the first step whose top token differs.
* :func:`disagreement_scan`: many test questions. Where a variant's answer differs from FP's,
  and how far the probability of the right answer fell.
* :func:`bit_sweep`: accuracy against bit-width for some recipes (a quantization and an
  evaluation per point).
* :func:`vocabulary_hint`: words of a question the tokenizer does not know, and the answers the
  task has, for questions outside what the model was trained on.

Everything returns plain data (dicts, lists, floats) for :mod:`qvlm.ui.plots` and the UI.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from qvlm.data import DEFAULT_TASK, VQASample, get_task, normalize_answer
from qvlm.evaluation.accuracy import evaluate
from qvlm.evaluation.bench import quantize_and_evaluate
from qvlm.models.inference import answer_token_ids, continuation_probs, generate_answers, generate_token_ids
from qvlm.utils.progress import STAGE_EVAL, STAGE_SCAN, STAGE_SWEEP, ProgressCallback, check_cancel, report
from qvlm.quant import QuantConfig
from qvlm.quant.memory import WeightMemory, weight_memory


PAPER_TABLE3_SOURCE = "Wang et al., Q-VLM, NeurIPS 2024, Table 3"
PAPER_TABLE3_LLAVA15_7B: dict[str, dict[str, dict[str, float]]] = {
    "SQA": {"FP": {"FP": 66.79}, "W6A6": {"AWQ": 65.87, "QLoRA": 66.16, "Q-VLM": 66.67},
            "W4A4": {"AWQ": 56.73, "QLoRA": 56.50, "Q-VLM": 57.70}},
    "VizWiz": {"FP": {"FP": 49.87}, "W6A6": {"AWQ": 48.51, "QLoRA": 49.23, "Q-VLM": 49.86},
               "W4A4": {"AWQ": 44.29, "QLoRA": 44.73, "Q-VLM": 45.82}},
    "VQA v2": {"FP": {"FP": 78.50}, "W6A6": {"AWQ": 77.51, "QLoRA": 77.58, "Q-VLM": 78.52},
               "W4A4": {"AWQ": 71.89, "QLoRA": 72.02, "Q-VLM": 72.51}},
}
"""LLaVA-v1.5-7B accuracy (%) by dataset -> bit setting -> method, from the paper's Table 3
(arXiv 2410.08119). Only FP, W6A6 and W4A4 are in the paper's table: it has no
W8A8, W4A3 or W3A3 column."""


# ---------------------------------------------------------------------------- token by token
def _top_k(probs: torch.Tensor, tokenizer: Any, k: int) -> list[tuple[str, float]]:
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) in nats along the last dim; probabilities in, zeros of p contribute nothing."""
    q = q.clamp_min(1e-12)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-12).log() - q.log()), torch.zeros_like(p)).sum(-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-8 where the two are equal


def _fp_answer_ids(handle: Any, image: Image.Image, question: str, max_new_tokens: int) -> list[int]:
    """FP's greedy tokens up to and including its end-of-sequence token (that step is a choice too)."""
    tokenizer = handle.processor.tokenizer
    ids = generate_token_ids(handle.model, handle.processor, [image], [question], max_new_tokens)[0].tolist()
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    out = []
    for t in ids:
        out.append(t)
        if t in stop:
            break
    if out and out[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
        out.pop()
    return out


TopTokens = list[tuple[str, float]]
"""One step's most likely next tokens and their probabilities, most likely first."""


@dataclass(frozen=True)
class VariantTokens:
    """One variant fed FP's answer token by token: its top tokens and KL(FP‖variant) per step.

    ``answer``: its own greedy answer; ``flipped``: whether that differs from FP's (normalized as the task
    scores); ``first_diff``: the first step whose top token is not FP's (None: none is).
    """

    answer: str
    flipped: bool
    first_diff: int | None
    kl: list[float]
    top: list[TopTokens]


@dataclass(frozen=True)
class TokenComparison:
    """FP's greedy answer to one question, step by step, and every variant teacher-forced on it."""

    question: str
    fp_answer: str
    tokens: list[str]
    fp_top: list[TopTokens]
    variants: dict[str, VariantTokens] = field(default_factory=dict)


def token_comparison(
    fp: Any, variants: Mapping[str, Any], image: Image.Image, question: str, top_k: int = 5, max_new_tokens: int = 16
) -> TokenComparison:
    """Per generated step of FP's greedy answer: each model's top-k next tokens, KL(FP‖variant) and flips.

    ``fp`` and each value of ``variants`` (label -> handle) carry ``.model`` and ``.processor``.
    """
    tokenizer = fp.processor.tokenizer
    ids = _fp_answer_ids(fp, image, question, max_new_tokens)
    fp_answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    fp_probs = continuation_probs(fp.model, fp.processor, [image], [question], [ids])[0]
    out = TokenComparison(question, fp_answer, tokenizer.convert_ids_to_tokens(ids),
                          [_top_k(p, tokenizer, top_k) for p in fp_probs])
    for label, handle in variants.items():
        probs = continuation_probs(handle.model, handle.processor, [image], [question], [ids])[0]
        own = generate_answers(handle.model, handle.processor, [image], [question], max_new_tokens)[0]
        diff = [j for j, t in enumerate(ids) if int(probs[j].argmax()) != t]
        out.variants[label] = VariantTokens(
            answer=own, flipped=normalize_answer(own) != normalize_answer(fp_answer),
            first_diff=diff[0] if diff else None, kl=[float(v) for v in kl_divergence(fp_probs, probs)],
            top=[_top_k(p, tokenizer, top_k) for p in probs])
    return out


# ---------------------------------------------------------------------------- question by question
def disagreement_scan(
    fp: Any,
    variants: Mapping[str, Any],
    samples: Sequence[VQASample],
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Answer every sample with FP and each variant; note answers that differ and the right answer's probability.

    The right answer's probability is the teacher-forced product over its tokens (no end-of-turn
    token): how much the model believes it, even where the greedy answer does not change.
    Returns ``{"n", "labels", "counts": {label: answers differing from FP}, "rows": [...]}``, one
    row per sample in order: ``{"index", "image_id", "split", "question", "answer", "fp_answer",
    "fp_p", "answers": {label: str}, "p": {label: float}, "flipped": [labels], "drop": max FP p -
    variant p}``. Order them with :func:`rank_disagreements`.
    """
    if not samples:
        raise ValueError("nothing to scan: the question list is empty")
    models = {"FP": fp, **variants}
    labels = list(variants)
    rows: list[dict[str, Any]] = []
    for at in range(0, len(samples), batch_size):
        check_cancel(cancel, "disagreement scan")
        chunk = list(samples[at : at + batch_size])
        images = [s.load_image() for s in chunk]
        questions = [s.question for s in chunk]
        right = [answer_token_ids(fp.processor, s.question, s.answer) for s in chunk]
        answers, p_right = {}, {}
        for label, h in models.items():
            answers[label] = generate_answers(h.model, h.processor, images, questions)
            probs = continuation_probs(h.model, h.processor, images, questions, right)
            p_right[label] = [math.exp(sum(math.log(max(float(p[j, t]), 1e-30)) for j, t in enumerate(ids)))
                              for p, ids in zip(probs, right, strict=True)]
        for i, s in enumerate(chunk):
            fp_norm = normalize_answer(answers["FP"][i])
            rows.append({
                "index": at + i, "image_id": s.image_id, "split": s.split, "question": s.question,
                "answer": s.answer, "fp_answer": answers["FP"][i], "fp_p": p_right["FP"][i],
                "answers": {lab: answers[lab][i] for lab in labels}, "p": {lab: p_right[lab][i] for lab in labels},
                "flipped": [lab for lab in labels if normalize_answer(answers[lab][i]) != fp_norm],
                "drop": max((p_right["FP"][i] - p_right[lab][i] for lab in labels), default=0.0),
            })
        done = min(at + batch_size, len(samples))
        report(progress, STAGE_SCAN, done / len(samples), f"{done}/{len(samples)} questions")
    return {"n": len(rows), "labels": labels, "rows": rows,
            "counts": {lab: sum(lab in r["flipped"] for r in rows) for lab in labels}}


def rank_disagreements(scan: Mapping[str, Any], limit: int = 24, min_drop: float = 1e-3) -> list[dict[str, Any]]:
    """The questions to look at: every one whose answer flipped, then the largest drops of the right answer's
    probability among the others (drops above ``min_drop`` only: below it is rounding), at most ``limit`` in all."""
    rows = scan["rows"]
    flipped = sorted((r for r in rows if r["flipped"]), key=lambda r: -r["drop"])
    dropped = sorted((r for r in rows if not r["flipped"] and r["drop"] > min_drop), key=lambda r: -r["drop"])
    return (flipped + dropped)[:limit]


# ---------------------------------------------------------------------------- bit by bit
@dataclass(frozen=True)
class SweepPoint:
    """One point of the bit-width sweep: a recipe at a bit setting (FP: "fp" / "FP"), scored on the sweep's
    questions; ``quant_bytes``: its weights' bytes as stored (FP: in FP16)."""

    recipe: str
    bits: str
    accuracy: float
    n: int
    quant_bytes: int


def bit_sweep(
    fp: Any,
    recipes: Sequence[str],
    bits: Sequence[str],
    samples: Sequence[VQASample],
    calib_size: int = 16,
    quantize: Callable[..., Any] | None = None,
    measure_memory: Callable[[Any], WeightMemory] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    **config: Any,
) -> list[SweepPoint]:
    """Accuracy on ``samples`` for FP and every (recipe, bit setting), each quantized with ``calib_size`` pairs.

    Each point is one :func:`qvlm.evaluation.bench.quantize_and_evaluate`, which drops the quantized
    copy after its evaluation, so the sweep holds one at a time. ``quantize`` defaults to
    :func:`qvlm.quant.quantize` and ``measure_memory`` to :func:`qvlm.quant.memory.weight_memory`
    (a test passes stand-ins); ``config`` goes to every
    :class:`~qvlm.quant.QuantConfig`. Returns one :class:`SweepPoint` per point, FP first.
    """
    measure_memory = measure_memory or weight_memory
    configs = [QuantConfig.from_bits(b, recipe=r, calib_size=calib_size, **config) for r in recipes for b in bits]
    if not configs:
        raise ValueError("Choose at least one recipe and one bit-width to sweep.")
    total = len(configs) + 1
    samples = list(samples)

    def point_progress(what: str, i: int) -> ProgressCallback | None:
        """Point ``i``'s stages on the sweep's one bar: quantizing holds it at the point's start, answering moves it."""
        if progress is None:
            return None

        def forward(stage: str, fraction: float, message: str) -> None:
            if stage == STAGE_EVAL:
                report(progress, STAGE_SWEEP, (i + fraction) / total, f"{what}: {message}")
            else:
                report(progress, STAGE_SWEEP, i / total, f"{what}: {stage}, {message}")
        return forward

    fp_eval = evaluate(fp.model, fp.processor, samples, cancel=cancel, progress=point_progress("FP", 0))
    points = [SweepPoint("fp", "FP", fp_eval.accuracy, fp_eval.n, measure_memory(fp.model).fp16_bytes)]
    for i, cfg in enumerate(configs, start=1):
        what = f"{cfg.bits_label} {cfg.recipe}"
        report(progress, STAGE_SWEEP, i / total, f"{what}: quantizing")
        row = quantize_and_evaluate(
            fp, cfg, samples, batch_size=32, quantize=quantize, progress=point_progress(what, i), cancel=cancel,
            describe=lambda result: {"quant_bytes": measure_memory(result.handle.model).quant_bytes})
        points.append(SweepPoint(row["recipe"], row["bits"], row["accuracy"], row["n"], row["quant_bytes"]))
    return points


# ---------------------------------------------------------------------------- outside the task
def unknown_words(tokenizer: Any, question: str) -> list[str]:
    """Words of ``question`` that the tokenizer maps to its unknown token (a word-level vocabulary's gaps).

    Empty for tokenizers with no unknown token, or that spell every word from pieces (BPE).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    words = [w.strip("?.,!;:\"'()") for w in question.split()]
    return [w for w in words if w and unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def vocabulary_hint(tokenizer: Any, question: str, answers: Sequence[str], task: str = DEFAULT_TASK
                    ) -> dict[str, Any] | None:
    """What the model knows, when the question or its answers fall outside its task; None when both are inside.

    ``answers``: what the models said; ``task``: the model's task (:data:`qvlm.data.TASKS`), whose answer set
    is what the model knows. Returns ``{"unknown": [words], "outside": [answers not in the task's
    answer set], "known_answers": [the task's answers]}``.
    """
    vocabulary = get_task(task).answers()
    unknown = unknown_words(tokenizer, question)
    outside = sorted({a for a in answers if normalize_answer(a) not in vocabulary})
    if not unknown and not outside:
        return None
    return {"unknown": unknown, "outside": outside, "known_answers": vocabulary}
