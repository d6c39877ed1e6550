"""Closed-form baselines on paired activations X_a, X_b: [n, d_model] (row i of A pairs with row i of B).

Plain functions returning tensors, plus `apply_*` helpers that use them; nothing here is trained
or registered. To use a baseline through the Mapper interface, load its tensors into the family:
`TranslationMap` (r), `OrthogonalMap.from_procrustes`, or `AffineMap` with W_map = W - I.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor


def _check_paired(X_a: Tensor, X_b: Tensor) -> None:
    """Raise unless X_a and X_b are [n, d] with the same n and d."""
    if X_a.ndim != 2 or X_a.shape != X_b.shape:
        raise ValueError(
            f"Expected paired activations X_a, X_b of the same shape [n, d_model]; got "
            f"{tuple(X_a.shape)} and {tuple(X_b.shape)}."
        )


def mean_difference(
    X_a: Annotated[Tensor, "n_a d_model"], X_b: Annotated[Tensor, "n_b d_model"]
) -> Annotated[Tensor, "d_model"]:
    """CAA-style steering vector r = mean(X_b) - mean(X_a) (rows need not be paired)."""
    return X_b.mean(0) - X_a.mean(0)


def procrustes(
    X_a: Annotated[Tensor, "n d_model"], X_b: Annotated[Tensor, "n d_model"]
) -> tuple[
    Annotated[Tensor, "d_model d_model"], Annotated[Tensor, "d_model"], Annotated[Tensor, "d_model"]
]:
    """Orthogonal Procrustes on centred pairs: R minimising |(X_a - mu_a) R - (X_b - mu_b)|_F.

    Returns (R, mu_a, mu_b); apply as (x - mu_a) @ R + mu_b. R may be a reflection (det -1).
    """
    _check_paired(X_a, X_b)
    A, B = (
        X_a.double(),
        X_b.double(),
    )  # the SVD is the precision bottleneck; float64 is cheap at d_model
    mu_a, mu_b = A.mean(0), B.mean(0)
    U, _, Vh = torch.linalg.svd((A - mu_a).T @ (B - mu_b))
    R = U @ Vh
    return R.to(X_a.dtype), mu_a.to(X_a.dtype), mu_b.to(X_a.dtype)


def least_squares_affine(
    X_a: Annotated[Tensor, "n d_model"], X_b: Annotated[Tensor, "n d_model"], ridge: float = 1e-3
) -> tuple[Annotated[Tensor, "d_model d_model"], Annotated[Tensor, "d_model"]]:
    """Ridge least squares for y = x @ W + b; the ridge shrinks W toward the identity, not zero.

    Minimises mean_i |x_i W + b - y_i|^2 + ridge |W - I|_F^2, so the ridge is per-sample (its
    meaning does not change with n) and directions the data never spans pass through unchanged,
    as in AffineMap's residual form, instead of being zeroed. Needs ridge > 0 when n <= d_model.
    """
    _check_paired(X_a, X_b)
    A, B = X_a.double(), X_b.double()
    mu_a, mu_b = A.mean(0), B.mean(0)
    Ac, Bc = A - mu_a, B - mu_b
    n, d = A.shape
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    W = torch.linalg.solve(Ac.T @ Ac / n + ridge * eye, Ac.T @ Bc / n + ridge * eye)
    b = mu_b - mu_a @ W
    return W.to(X_a.dtype), b.to(X_a.dtype)


def apply_translation(
    x: Annotated[Tensor, "... d_model"], r: Annotated[Tensor, "d_model"]
) -> Annotated[Tensor, "... d_model"]:
    """x + r (the mean_difference baseline)."""
    return x + r


def apply_orthogonal(
    x: Annotated[Tensor, "... d_model"],
    R: Annotated[Tensor, "d_model d_model"],
    mu_a: Annotated[Tensor, "d_model"],
    mu_b: Annotated[Tensor, "d_model"],
) -> Annotated[Tensor, "... d_model"]:
    """(x - mu_a) @ R + mu_b (the procrustes baseline)."""
    return (x - mu_a) @ R + mu_b


def apply_affine(
    x: Annotated[Tensor, "... d_model"],
    W: Annotated[Tensor, "d_model d_model"],
    b: Annotated[Tensor, "d_model"],
) -> Annotated[Tensor, "... d_model"]:
    """x @ W + b (the least_squares_affine baseline)."""
    return x @ W + b
