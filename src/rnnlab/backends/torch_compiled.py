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

from .torch_backend import TorchBackend


class TorchCompiledBackend(TorchBackend):
    """TorchBackend whose per-minibatch loss (`_loss`) is compiled; the training step is otherwise the same."""
    name = "torch-compile"

    def __init__(self, params, activation="tanh", device="cpu", matmul_dtype="same"):
        super().__init__(params, activation, device, matmul_dtype=matmul_dtype)
        self._loss = torch.compile(self._loss, dynamic=False)
