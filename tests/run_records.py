"""Typed run records for tests: the rows a plot or a sentence reads, with only the fields a test sets.

Why: the records (:mod:`qvlm.quant.records`, :mod:`qvlm.evaluation.analysis`) require every field a real run
measures; a test that draws one layer's error should not have to invent the rest.
"""

from __future__ import annotations

from qvlm.evaluation.analysis import DedPoint, PairSummary
from qvlm.evaluation.compare import TokenComparison, VariantTokens
from qvlm.evaluation.modality import ModalityRow, TokenRange
from qvlm.quant.records import BlockSearchRow, HeldOutError, LayerError, VeoEpoch, VeoStep


def layer_error(tower: str, index: int, quant_mse: float | None, init_mse: float | None = None,
                fp_mse: float = 0.0) -> LayerError:
    """fp_mse 0: the FP output's power unknown, so the error is shown absolute."""
    return LayerError(tower, index, fp_mse, init_mse, quant_mse)


def veo_step(step: int, epoch: int = 1, total: float = 1.0, reg: float = 0.0, ent: float = 0.0,
             err: float = 0.0) -> VeoStep:
    return VeoStep(step, epoch, total, reg, ent, err)


def held_out(err: float, answer_kl: float = 0.0) -> HeldOutError:
    return HeldOutError(visual=err, output=0.0, err=err, answer_agree=1.0, answer_kl=answer_kl, answer_tokens=1)


def veo_epoch(epoch: int, err: float, kept: bool = False, answer_kl: float = 0.0,
              ceiling_kl: float | None = None) -> VeoEpoch:
    ceiling = None if ceiling_kl is None else held_out(err, ceiling_kl)
    return VeoEpoch(epoch, held_out(err, answer_kl), kept, ceiling)


def ded_point(entropy: float, ded: float, qerr: float = 0.0, sample: int = 0) -> DedPoint:
    return DedPoint(sample, entropy, ded, qerr, greedy_error=ded, joint_error=0.0)


def pair(layer: int, interaction_share: float | None = 0.0, joint_equals_greedy: bool = True,
         r2_entropy: float = 0.0, r2_chance: float = 1.0, **measures) -> PairSummary:
    return PairSummary(layer=layer, block=[layer, layer + 1], n=16, r2_entropy=r2_entropy, r2_qerr=0.0,
                       r2_chance=r2_chance, interaction_share=interaction_share,
                       joint_equals_greedy=joint_equals_greedy, **measures)


def search_row(block: list[int], accepted: bool, accept_errors: dict[str, list[float]] | None = None) -> BlockSearchRow:
    return BlockSearchRow(block=block, choice=[1.0] * len(block), accepted=accepted, greedy=[1.0] * len(block),
                          error=0.0, greedy_error=0.0, incumbent_error=None, objective="block_output",
                          layer_passes=1, accept_errors=accept_errors or {})


def token_comparison(tokens: list[str], variants: dict[str, tuple[list[float], int | None]]) -> TokenComparison:
    """FP's ``tokens`` and, per label, (KL per step, first differing step); answers and top tokens made up."""
    top = [[(t, 1.0)] for t in tokens]
    return TokenComparison("q?", "".join(tokens), tokens, top,
                           {label: VariantTokens("x", first is not None, first, kl, top)
                            for label, (kl, first) in variants.items()})


def modality_row(layer: int, image_p: float, text_p: float, image_max: float | None = None,
                 text_max: float | None = None, percentile: float = 99.9, tokens: int = 16) -> ModalityRow:
    return ModalityRow(layer, percentile, TokenRange(image_p, image_max or image_p, tokens),
                       TokenRange(text_p, text_max or text_p, tokens))
