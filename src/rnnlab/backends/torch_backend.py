"""The torch backend: the same forward math as the reference, differentiated by autograd, on CPU or CUDA.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.
Parameters are plain tensors (no requires_grad); each training step differentiates detached leaf views of
them, so the backend-neutral optimizer can update them in place like numpy arrays.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import cells
from ..errors import RnnlabError

_PHI = {"tanh": torch.tanh, "relu": torch.relu}


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RnnlabError(f"unknown torch device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RnnlabError(f"--device {name}: CUDA is not available on this machine")
    return device


class TorchBackend:
    name = "torch"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False):
        self.device = _device(device)
        self.params = {k: torch.tensor(np.asarray(v), device=self.device) for k, v in params.items()}
        self.phi = _PHI[activation]
        self.onehot_input = onehot_input

    @property
    def dtype(self):
        return self.params["W_hh"].dtype

    def begin_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros((batch_size, self.params["W_hh"].shape[0]), dtype=self.dtype, device=self.device)

    def _tensor(self, X) -> torch.Tensor:
        return torch.as_tensor(np.asarray(X, dtype=np.int64), device=self.device)

    def forward(self, p: dict, X: torch.Tensor, H: torch.Tensor):
        """X (B, T) indices, H (B, H) -> logits (T*B, V) and the final state."""
        if self.onehot_input:
            XW = F.one_hot(X.T, p["W_xh"].shape[0]).to(self.dtype) @ p["W_xh"]  # (T, B, V) @ (V, H)
        else:
            XW = cells.input_projection(p["W_xh"], X)                           # (T, B, H)
        Hs = []
        for XW_t in XW.unbind(0):   # unbind, not XW[t]: indexing's backward zero-fills all of XW per step
            H = cells.rnn_step(XW_t, H, p["W_hh"], p["b_h"], self.phi)
            Hs.append(H)
        return cells.output_layer(torch.stack(Hs), p["W_hq"], p["b_q"]), H

    def loss_and_grads(self, X, Y, state):
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        logits, H = self.forward(leaves, self._tensor(X), state)
        loss = F.cross_entropy(logits, self._tensor(Y).T.reshape(-1))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return float(loss.detach()), dict(zip(leaves, grads)), H.detach()

    @torch.inference_mode()
    def nll(self, X, Y, state):
        logits, H = self.forward(self.params, self._tensor(X), state)
        loss = F.cross_entropy(logits.double(), self._tensor(Y).T.reshape(-1), reduction="sum")
        return float(loss), H

    @torch.inference_mode()
    def step(self, token_ids, state):
        logits, H = self.forward(self.params, self._tensor(token_ids).reshape(-1, 1), state)
        return logits.cpu().numpy(), H

    def decoder(self):
        """A `generate` step callback (the same interface as the numpy backend's)."""
        return self.step

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.params.items()}
