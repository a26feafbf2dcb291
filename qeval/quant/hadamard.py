"""Hadamard matrices of the sizes real models need, and randomized rotations.

A Hadamard matrix of order n (entries +-1, H H^T = n I) exists for n = 1, 2 and
multiples of 4 (conjecturally); constructions used here:

* Sylvester: H_2n = [[H, H], [H, -H]] (powers of two),
* Paley I: order q + 1 for a prime q = 3 (mod 4),
* Paley II: order 2 (q + 1) for a prime q = 1 (mod 4),
* Kronecker products of the above.

That covers the widths of the supported families (576 = 36 * 16 with Paley II on
q = 17; 1536 = 12 * 128; 640 = 20 * 32; 896 = 28 * 32 with q = 13; 4864 = 76 * 64
with q = 37).  Where no construction is found, :func:`random_rotation` falls back to
a random orthogonal matrix (QR of a Gaussian), which is as valid for rotations
fused into weights; only the cost of an online transform differs.
"""

from __future__ import annotations

from functools import cache

import torch


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime = 3 mod 4."""
    Q = _jacobsthal(q)
    n = q + 1
    H = torch.ones(n, n, dtype=torch.float64)
    H[1:, 1:] = Q + torch.eye(q, dtype=torch.float64)
    H[1:, 0] = -1
    return H


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q prime = 1 mod 4."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = 1
    S[1:, 1:] = Q
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(S, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@cache
def _base(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@cache
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64, entries +-1), or None if not constructible."""
    power = 1
    while n % power == 0:
        m = n // power
        base = _base(m)
        if base is not None:
            H = base
            sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            p = power
            while p > 1:
                H = torch.kron(H, sylvester)
                p //= 2
            return H
        power *= 2
    return None


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal matrix (float64): a randomized Hadamard H diag(+-1) / sqrt(n)
    when one can be built, else the Q of a Gaussian's QR."""
    g = torch.Generator().manual_seed(seed)
    H = hadamard(n)
    if H is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return H * signs[None, :] / n**0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
