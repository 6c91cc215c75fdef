"""The torch.compile path: the autograd backend's training step, compiled by TorchInductor.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, S = state slices.

The loss of one minibatch (input projection, the loop over time and layers, the output layer and the cross
entropy) is one function; `torch.compile` traces it, unrolls the loops and fuses the elementwise work
around each matmul, and AOTAutograd compiles its backward the same way. The first minibatch of each new
(B, T) pays the compile (tens of seconds on a small CPU); after that the compiled graphs are reused. Scoring
and decoding stay eager: their shapes change call to call and they are not the bottleneck.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import network
from .torch_backend import TorchBackend, TorchOps


class TorchCompiledBackend(TorchBackend):
    name = "torch"

    def __init__(self, params, activation="tanh", device="cpu"):
        super().__init__(params, activation, device)
        arch, phi = self.arch, self.phi

        def loss(params: dict, X, y, state, masks):
            """X (B, T), y (T*B,) time-major targets, state (S, B, H) -> (mean loss, final state)."""
            logits, new_state, _ = network.forward(params, X, state, arch, TorchOps, phi, masks)
            return F.cross_entropy(logits, y), new_state
        self._compiled = torch.compile(loss, dynamic=False)

    def loss_and_grads(self, X, Y, state, masks=None):
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        y = self._tensor(Y).T.reshape(-1)
        loss, new_state = self._compiled(leaves, self._tensor(X), y, state, self._masks(masks))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return float(loss.detach()), dict(zip(leaves, grads)), new_state.detach()
