"""Find the rows of a batch that are exact copies of earlier ones, cheaply: a fingerprint per row, then an exact
comparison of the rows whose fingerprints agree (a fingerprint collision never merges two different rows)."""

from __future__ import annotations

import torch


def distinct_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """x (r, ...) -> (first, inverse): the index of each distinct row's first occurrence, and for every row the
    position in `first` of the row equal to it (bitwise equal values; x[first][inverse] == x)."""
    r = x.shape[0]
    if r <= 1:
        return list(range(r)), list(range(r))
    flat = x.reshape(r, -1)
    weights = torch.linspace(1.0, 2.0, flat.shape[1], device=x.device, dtype=torch.float64)
    prints = (flat.double() @ weights).tolist()  # (r,) equal rows give equal fingerprints
    first: list[int] = []
    inverse: list[int] = []
    seen: dict[float, list[int]] = {}  # fingerprint -> positions in `first` with it
    for i, fingerprint in enumerate(prints):
        same = seen.setdefault(fingerprint, [])
        match = next((k for k in same if torch.equal(flat[first[k]], flat[i])), None)
        if match is None:
            match = len(first)
            first.append(i)
            same.append(match)
        inverse.append(match)
    return first, inverse
