"""The torch.compile path: the autograd backend's training step, compiled by TorchInductor.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

The loss of one minibatch (gathered input projection, the T-step loop, the output layer and the cross
entropy) is one function; `torch.compile` traces it, unrolls the loop over time and fuses the elementwise
work around each matmul, and AOTAutograd compiles its backward the same way. The first minibatch of each new
(B, T) pays the compile (tens of seconds on a small CPU); after that the compiled graphs are reused. Scoring
and decoding stay eager: their shapes change call to call and they are not the bottleneck.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cells
from .torch_backend import TorchBackend


def _loss(phi, W_xh, W_hh, b_h, W_hq, b_q, X, y, H):
    """X (B, T) indices, y (T*B,) time-major targets, H (B, H) -> (mean loss, final state)."""
    XW = cells.input_projection(W_xh, X)                            # (T, B, H), b_h not yet added
    Hs = []
    for XW_t in XW.unbind(0):
        H = cells.rnn_step(XW_t, H, W_hh, b_h, phi)
        Hs.append(H)
    logits = cells.output_layer(torch.stack(Hs), W_hq, b_q)         # (T*B, V)
    return F.cross_entropy(logits, y), H


class TorchCompiledBackend(TorchBackend):
    name = "torch"

    def __init__(self, params, activation="tanh", device="cpu"):
        super().__init__(params, activation, device)
        phi = self.phi

        def loss(W_xh, W_hh, b_h, W_hq, b_q, X, y, H):
            return _loss(phi, W_xh, W_hh, b_h, W_hq, b_q, X, y, H)
        self._compiled = torch.compile(loss, dynamic=False)

    def loss_and_grads(self, X, Y, state):
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        y = self._tensor(Y).T.reshape(-1)
        loss, H = self._compiled(*(leaves[k] for k in cells.PARAM_NAMES), self._tensor(X), y, state)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return float(loss.detach()), dict(zip(leaves, grads)), H.detach()
