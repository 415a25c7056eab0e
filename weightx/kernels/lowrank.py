"""Truncated SVD of a float32 matrix: exact, or randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4).

The randomized form sketches the range with q = r + oversample Gaussian directions and refines it by
`niter` power iterations (QR-orthonormalised each time); its error approaches the exact SVD tail as the
spectrum decays. The Gaussian sketch comes from a generator seeded by the caller (weightx keys it by
the tensor name), so results are reproducible to the byte on one device.
"""

from __future__ import annotations

import torch


def truncated_svd(d: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, Vh) of d, all singular triplets (rank None) or the leading `rank`; exact."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if rank is None:
        return u, s, vh
    return u[:, :rank], s[:rank], vh[:rank]


def randomized_svd(d: torch.Tensor, rank: int, seed: int, oversample: int = 8, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, r], s [r], Vh [r, n]): the leading `rank` singular triplets of d, approximately."""
    m, n = d.shape
    q = min(rank + oversample, m, n)
    gen = torch.Generator(device=d.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=d.device, dtype=d.dtype)
    basis = torch.linalg.qr(d @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(d.T @ basis).Q
        basis = torch.linalg.qr(d @ basis).Q
    ub, s, vh = torch.linalg.svd(basis.T @ d, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


__all__ = ["randomized_svd", "truncated_svd"]
