"""Greedy layer-wise (Eq. 2) and joint block-wise (Eq. 3) search over per-layer candidates.

The search is generic: a *block* is a list of layers, each with a few candidates (here: the
percentile p that sets every activation range of the layer). The caller supplies

* ``apply(j, c)``      set layer j of the block to candidate c,
* ``forward(j, xs)``   run layer j on a list of per-batch inputs,
* ``error(j, ys)``     per-sample error of layer j's output against its FP reference ([S]).

Exhaustive joint search walks the candidate tree depth first, so every prefix is computed once
(|G| + |G|^2 + ... layer passes). The greedy solution of Eq. 2 is one leaf of that tree (at each
depth, the candidate minimising *that layer's* error given the prefix), so the joint optimum is
never worse than greedy on the block objective, by construction, and both come from one walk.
Per-sample errors of every prefix are kept, which is what the DED analysis needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Apply = Callable[[int, int], None]
Forward = Callable[[int, list[torch.Tensor]], list[torch.Tensor]]
ErrorFn = Callable[[int, list[torch.Tensor]], torch.Tensor]


@dataclass
class BlockSearch:
    choice: tuple[int, ...]
    greedy_choice: tuple[int, ...]
    error: float
    greedy_error: float
    layer_passes: int
    prefix_errors: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)
    accepted: bool = True
    """False when the caller put the block back at its incumbent (CDM's final-output check)."""
    accept_errors: dict[str, list[float]] = field(default_factory=dict)
    """Per acceptance check ("calibration", "holdout"): the final-output error [chosen, incumbent]."""

    def per_sample_greedy(self, n_layers: int, n_cands: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """Block-output error of the greedy choice made for each sample on its own."""
        first = next(iter(self.prefix_errors.values()))
        errs, choices = torch.empty_like(first), []
        for s in range(first.numel()):
            prefix: tuple[int, ...] = ()
            for _ in range(n_layers):
                prefix = min((prefix + (c,) for c in range(n_cands)), key=lambda p: float(self.prefix_errors[p][s]))
            errs[s] = self.prefix_errors[prefix][s]
            choices.append(prefix)
        return errs, choices

    def per_sample_joint(self, n_layers: int) -> torch.Tensor:
        """Block-output error of the joint optimum found for each sample on its own."""
        leaves = torch.stack([e for p, e in self.prefix_errors.items() if len(p) == n_layers])
        return leaves.min(dim=0).values


def _greedy_walk(prefix_errors: dict, n_layers: int, n_cands: int) -> tuple[int, ...]:
    prefix: tuple[int, ...] = ()
    for _ in range(n_layers):
        prefix = min((prefix + (c,) for c in range(n_cands)), key=lambda p: float(prefix_errors[p].mean()))
    return prefix


def exhaustive_search(n_layers: int, n_cands: int, apply: Apply, forward: Forward, error: ErrorFn,
                      xs: list[torch.Tensor], on_pass: Callable[[], None] | None = None) -> BlockSearch:
    """Eq. 3 by enumeration (prefix-shared DFS). Leaves layers set to the joint optimum."""
    prefix_errors: dict[tuple[int, ...], torch.Tensor] = {}
    passes = 0
    best: dict = {"err": float("inf"), "chain": None}

    def dfs(j: int, inputs: list[torch.Tensor], prefix: tuple[int, ...], chain: list) -> None:
        nonlocal passes
        for c in range(n_cands):
            apply(j, c)
            ys = forward(j, inputs)
            passes += 1
            if on_pass:
                on_pass()
            e = error(j, ys).detach().cpu()
            prefix_errors[prefix + (c,)] = e
            if j + 1 < n_layers:
                dfs(j + 1, ys, prefix + (c,), chain + [ys])
            elif float(e.mean()) < best["err"]:
                best["err"], best["chain"] = float(e.mean()), chain + [ys]

    dfs(0, xs, (), [])
    leaves = {p: float(e.mean()) for p, e in prefix_errors.items() if len(p) == n_layers}
    choice = min(leaves, key=leaves.get)
    greedy = _greedy_walk(prefix_errors, n_layers, n_cands)
    for j, c in enumerate(choice):
        apply(j, c)
    return BlockSearch(choice, greedy, leaves[choice], leaves[greedy], passes, prefix_errors, best["chain"])


def coordinate_search(n_layers: int, n_cands: int, apply: Apply, forward: Forward, error: ErrorFn,
                      xs: list[torch.Tensor], max_rounds: int = 2,
                      on_pass: Callable[[], None] | None = None, start: tuple[int, ...] | None = None) -> BlockSearch:
    """Greedy (Eq. 2) first, then coordinate descent on the block objective (Eq. 3).

    Cheaper than enumeration; starts from the greedy choice (or from ``start``, e.g. the incumbent
    ranges, when that scores better on the block objective) and only accepts improvements, so it
    is never worse than greedy, nor than ``start``.
    """
    passes = 0
    prefix_errors: dict[tuple[int, ...], torch.Tensor] = {}
    inputs_at: list[list[torch.Tensor]] = [xs]
    choice: list[int] = []
    for j in range(n_layers):
        best = None
        for c in range(n_cands):
            apply(j, c)
            ys = forward(j, inputs_at[j])
            passes += 1
            if on_pass:
                on_pass()
            e = error(j, ys).detach().cpu()
            prefix_errors[tuple(choice) + (c,)] = e
            if best is None or float(e.mean()) < best[0]:
                best = (float(e.mean()), c, ys)
        choice.append(best[1])
        apply(j, best[1])
        inputs_at.append(best[2])
    greedy = tuple(choice)
    greedy_err = float(prefix_errors[greedy].mean())
    current_err = greedy_err
    from_start = False  # the greedy walk already scored every last-layer alternative after its prefix
    def chain(first: int, ys: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Run layers first..end on ``ys`` at their current candidates; every layer's output."""
        nonlocal passes
        outs = []
        for jj in range(first, n_layers):
            ys = forward(jj, ys)
            outs.append(ys)
            passes += 1
            if on_pass:
                on_pass()
        return outs

    if start is not None and tuple(start) != greedy:
        for j, c in enumerate(start):
            apply(j, c)
        outs = chain(0, xs)
        e = error(n_layers - 1, outs[-1]).detach().cpu()
        prefix_errors[tuple(start)] = e
        if float(e.mean()) < current_err:
            current_err, choice, inputs_at = float(e.mean()), list(start), [xs] + outs
            from_start = True
        else:
            for j, c in enumerate(choice):
                apply(j, c)
    for _ in range(max_rounds):
        improved = False
        for j in range(n_layers if from_start else n_layers - 1):
            for c in range(n_cands):
                if c == choice[j]:
                    continue
                trial = choice[:j] + [c] + choice[j + 1 :]
                if tuple(trial) in prefix_errors:
                    continue
                apply(j, c)
                outs = chain(j, inputs_at[j])
                e = error(n_layers - 1, outs[-1]).detach().cpu()
                prefix_errors[tuple(trial)] = e
                if float(e.mean()) < current_err:
                    current_err, choice, improved = float(e.mean()), trial, True
                    inputs_at = inputs_at[: j + 1] + outs
                else:
                    apply(j, choice[j])
        if not improved:
            break
    for j, c in enumerate(choice):
        apply(j, c)
    return BlockSearch(tuple(choice), greedy, current_err, greedy_err, passes, prefix_errors, inputs_at[1:])
