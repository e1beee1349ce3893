"""Greedy (Eq. 2) vs joint (Eq. 3) block search on synthetic blocks with known answers."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from qvlm.quant.search import coordinate_search, exhaustive_search


def _toy_block(n_layers: int, n_cands: int, seed: int):
    """Layers y = tanh(A_j x) + noise_c: candidate c of layer j adds its own distortion; the FP
    reference uses no distortion. Earlier distortions propagate (cross-layer dependency)."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(6, 6, generator=g) / 2 for _ in range(n_layers)]
    dist = [[torch.randn(6, 6, generator=g) * 0.3 for _ in range(n_cands)] for _ in range(n_layers)]
    x = [torch.randn(4, 5, 6, generator=g) for _ in range(2)]  # 2 batches x 4 samples
    state = [0] * n_layers

    def layer(j, z, c=None):
        c = state[j] if c is None else c
        m = mats[j] if c < 0 else mats[j] + dist[j][c]
        return [torch.tanh(t @ m.t()) for t in z]

    refs, r = [], x
    for j in range(n_layers):
        r = layer(j, r, c=-1)
        refs.append(r)

    def apply(j, c):
        state[j] = c

    def forward(j, z):
        return layer(j, z)

    def error(j, ys):
        return torch.cat([(y - ref).pow(2).mean(dim=(1, 2)) for y, ref in zip(ys, refs[j])])

    def block_error(choice):
        z = x
        for j, c in enumerate(choice):
            z = layer(j, z, c)
        return float(error(n_layers - 1, z).mean())

    return apply, forward, error, x, block_error, state


@pytest.mark.parametrize("seed", range(12))
def test_exhaustive_finds_the_optimum_and_is_never_worse_than_greedy(seed):
    n_layers, n_cands = 3, 4
    apply, forward, error, x, block_error, state = _toy_block(n_layers, n_cands, seed)
    res = exhaustive_search(n_layers, n_cands, apply, forward, error, x)
    brute = {c: block_error(c) for c in itertools.product(range(n_cands), repeat=n_layers)}
    assert res.choice == min(brute, key=brute.get)
    assert res.error == pytest.approx(min(brute.values()), rel=1e-5)
    assert res.error <= res.greedy_error + 1e-12
    assert res.greedy_error == pytest.approx(brute[res.greedy_choice], rel=1e-5)
    assert tuple(state) == res.choice  # left at the joint optimum
    assert res.layer_passes == n_cands + n_cands**2 + n_cands**3
    # the greedy choice really is greedy: layer 0 minimises its own output error
    first = min(range(n_cands), key=lambda c: float(res.prefix_errors[(c,)].mean()))
    assert res.greedy_choice[0] == first


def test_joint_strictly_beats_greedy_somewhere():
    wins = 0
    for seed in range(30):
        apply, forward, error, x, _, _ = _toy_block(2, 5, 100 + seed)
        res = exhaustive_search(2, 5, apply, forward, error, x)
        wins += res.error < res.greedy_error - 1e-9
    assert wins > 0  # otherwise the comparison would be vacuous


@pytest.mark.parametrize("seed", range(8))
def test_coordinate_search_never_worse_than_greedy(seed):
    apply, forward, error, x, block_error, state = _toy_block(3, 4, 50 + seed)
    res = coordinate_search(3, 4, apply, forward, error, x)
    assert res.error <= res.greedy_error + 1e-12
    assert res.error == pytest.approx(block_error(res.choice), rel=1e-5)
    assert tuple(state) == res.choice
    ex = exhaustive_search(3, 4, *_toy_block(3, 4, 50 + seed)[:3], x)
    assert res.greedy_choice == ex.greedy_choice
    assert res.layer_passes < ex.layer_passes


def test_per_sample_ded_is_non_negative():
    apply, forward, error, x, _, _ = _toy_block(2, 5, 7)
    res = exhaustive_search(2, 5, apply, forward, error, x)
    greedy, choices = res.per_sample_greedy(2, 5)
    joint = res.per_sample_joint(2)
    assert greedy.shape == joint.shape == (8,)
    assert bool((greedy >= joint - 1e-12).all())
    rng = random.Random(0)
    s = rng.randrange(8)
    leaves = {p: float(e[s]) for p, e in res.prefix_errors.items() if len(p) == 2}
    assert float(joint[s]) == pytest.approx(min(leaves.values()))


@pytest.mark.parametrize("seed", range(8))
def test_both_searches_never_end_worse_than_the_incumbent(seed):
    """Candidate 0 plays the incumbent (the ranges the search starts from, as in CDM's tables)."""
    n_layers, n_cands = 3, 4
    apply, forward, error, x, block_error, state = _toy_block(n_layers, n_cands, 200 + seed)
    incumbent = block_error((0,) * n_layers)
    ex = exhaustive_search(n_layers, n_cands, apply, forward, error, x)
    assert ex.error <= incumbent + 1e-9
    co = coordinate_search(n_layers, n_cands, *_toy_block(n_layers, n_cands, 200 + seed)[:3], x,
                           start=(0,) * n_layers)
    assert co.error <= incumbent + 1e-9 and co.error <= co.greedy_error + 1e-12
    assert co.error == pytest.approx(block_error(co.choice), rel=1e-5)


def test_coordinate_search_keeps_a_start_that_beats_greedy():
    # Layer 0's candidate 1 looks best on its own but candidate 0 is far better for the block.
    def forward(j, zs):
        return [z + (0.0 if j == 0 else 0.0) for z in zs]

    state = [0, 0]
    table = {(0, 0): 0.1, (0, 1): 0.5, (1, 0): 0.4, (1, 1): 0.3}
    own = {0: 0.2, 1: 0.1}

    def apply(j, c):
        state[j] = c

    def error(j, ys):
        value = own[state[0]] if j == 0 else table[tuple(state)]
        return torch.full((2,), value)

    x = [torch.zeros(2, 1, 1)]
    res = coordinate_search(2, 2, apply, forward, error, x, start=(0, 0))
    assert res.greedy_choice == (1, 1) and res.greedy_error == pytest.approx(0.3)
    assert res.choice == (0, 0) and res.error == pytest.approx(0.1) and tuple(state) == (0, 0)
