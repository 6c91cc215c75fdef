"""The torch backend: the same forward math as the reference, differentiated by autograd, on CPU or CUDA.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, S = state slices.
Parameters are plain tensors (no requires_grad); each training step differentiates detached leaf views of
them, so the backend-neutral optimizer can update them in place like numpy arrays.

With `matmul_dtype="bfloat16"` the training loss runs under torch.autocast: matmul operands in bf16 (twice
the throughput on CPUs with AVX-512 BF16 or AMX, and on GPUs), float32 master weights, float32 loss; the
LSTM's cell state stays float32 because float32 * bf16 promotes. Scoring (`token_nll`) runs under the same
autocast, so a run's held-out figures are those of the model it trains; decoding stays in the weights' dtype.
A backend built without bf16 (what `rnnlab eval` builds unless asked) scores in float32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import cells, network
from . import masked_params
from ..errors import RnnlabError

_PHI = {"tanh": torch.tanh, "relu": torch.relu}


class TorchOps:
    """The elementwise functions of `cells.step`, for torch tensors."""
    tanh = staticmethod(torch.tanh)
    sigmoid = staticmethod(torch.sigmoid)
    relu = staticmethod(torch.relu)
    stack = staticmethod(torch.stack)
    unbind = staticmethod(torch.unbind)
    cat = staticmethod(lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs, -1))
    one_hot = staticmethod(lambda X, vocab_size, like: F.one_hot(X, vocab_size).to(like.dtype))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RnnlabError(f"unknown torch device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RnnlabError(f"--device {name}: CUDA is not available on this machine")
    return device


class TorchBackend:
    name = "torch-autograd"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False, matmul_dtype: str = "same"):
        self.device = _device(device)
        self.autocast = matmul_dtype == "bfloat16"
        self.params = {k: torch.tensor(np.asarray(v), device=self.device) for k, v in params.items()}
        self.arch = cells.describe(self.params)
        self.phi = _PHI[activation]
        self.onehot_input = onehot_input

    @property
    def dtype(self):
        return self.params["W_hq"].dtype

    def begin_state(self, batch_size: int) -> torch.Tensor:
        """Zeros, (S, B, H)."""
        return torch.zeros((self.arch.num_state_slices, batch_size, self.arch.num_hiddens), dtype=self.dtype,
                           device=self.device)

    def _tensor(self, X) -> torch.Tensor:
        return torch.as_tensor(np.asarray(X, dtype=np.int64), device=self.device)

    def _masks(self, masks) -> torch.Tensor | None:
        """Dropout masks (L, T, B, H) drawn by the caller in numpy, as tensors of the model's dtype."""
        return None if masks is None else torch.as_tensor(masks, dtype=self.dtype, device=self.device)

    def forward(self, p: dict, X: torch.Tensor, state: torch.Tensor, masks=None):
        """X (B, T) indices, state (S, B, H) -> logits (T*B, V) and the final state."""
        logits, new_state, _ = network.forward(p, X, state, self.arch, TorchOps, self.phi, masks,
                                               self.onehot_input)
        return logits, new_state

    def _loss(self, params: dict, X, y, state, masks):
        """X (B, T), y (T*B,) time-major targets, state (S, B, H) -> (mean loss, final state)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, new_state = self.forward(params, X, state, masks)
        return F.cross_entropy(logits.to(self.dtype), y), new_state.to(self.dtype)

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """Mean loss, gradients and the detached final state. Weight-drop masks multiply the named weights
        inside the graph, so autograd's gradient w.r.t. each weight already carries its mask."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        used = masked_params(leaves, weight_masks, lambda m, p: torch.as_tensor(m, dtype=p.dtype, device=p.device))
        y = self._tensor(Y).T.reshape(-1)
        loss, new_state = self._loss(used, self._tensor(X), y, state, self._masks(masks))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return float(loss.detach()), dict(zip(leaves, grads)), new_state.detach()

    @torch.inference_mode()
    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state (S, B, H); no
        gradients, the training loss's matmul dtype."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, new_state = self.forward(self.params, self._tensor(X), state)
        nll = F.cross_entropy(logits.double(), self._tensor(Y).T.reshape(-1), reduction="none")
        return nll.cpu().numpy(), new_state.to(self.dtype)

    @torch.inference_mode()
    def step(self, token_ids, state):
        logits, new_state = self.forward(self.params, self._tensor(token_ids).reshape(-1, 1), state)
        return logits.cpu().numpy(), new_state

    def decoder(self):
        """A `generate` step callback (the same interface as the numpy backend's)."""
        return self.step

    def update(self, fn) -> None:
        """Apply an update: the parameters become fn(parameters), tensors on this backend's device."""
        self.params = dict(fn(self.params))

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.params.items()}
