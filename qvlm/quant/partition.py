"""Block partition of the decoder layers (paper §3.2, Eqs. 6-7).

D(k_r, k_s) = sum_{k=k_r}^{k_s-1} D(k, k+1); layers k_r..k_s form one block if
D(k_r, k_s) > (k_s - k_r) * h0, i.e. the *average* dependency of the span's adjacent pairs
exceeds h0. Greedy from the bottom: grow the current block while it stays under the maximum
depth and the condition holds; otherwise close it and start a new one at the next layer.
"""

from __future__ import annotations


def partition_layers(entropies: list[float], h0: float, max_depth: int) -> list[list[int]]:
    """Blocks of consecutive layer indices for ``len(entropies) + 1`` layers.

    ``entropies[k]`` is D(k, k+1). Every layer is in exactly one block; blocks have at most
    ``max_depth`` layers.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    n_layers = len(entropies) + 1
    blocks: list[list[int]] = []
    start = 0
    while start < n_layers:
        end = start
        while end + 1 < n_layers and (end + 1 - start + 1) <= max_depth:
            span = entropies[start : end + 1]  # pairs (start, start+1) .. (end, end+1)
            if sum(span) > len(span) * h0:
                end += 1
            else:
                break
        blocks.append(list(range(start, end + 1)))
        start = end + 1
    return blocks


def singleton_blocks(n_layers: int) -> list[list[int]]:
    return [[k] for k in range(n_layers)]
