"""Gradient clipping and SGD, written once for every backend.

They use only elementwise arithmetic, `.sum()` and in-place updates, which numpy arrays and torch tensors
share, so the reference and the fast backends run literally the same update code.
"""
from __future__ import annotations


def grad_norm(grads: dict) -> float:
    """Global L2 norm over all gradients, as the book's `grad_clipping` computes it."""
    return float(sum((g * g).sum() for g in grads.values())) ** 0.5


def clip_grad_norm(grads: dict, theta: float) -> tuple[float, bool]:
    """Scale all gradients by theta / norm when the norm exceeds theta (theta = 0: never).

    Returns the norm before clipping and whether it clipped.
    """
    norm = grad_norm(grads)
    if theta > 0 and norm > theta:
        scale = theta / norm
        for g in grads.values():
            g *= scale
        return norm, True
    return norm, False


def sgd(params: dict, grads: dict, lr: float) -> None:
    """The book's `sgd` with batch_size=1 (the loss is already a mean): param -= lr * grad, in place."""
    for name, p in params.items():
        p -= lr * grads[name]
