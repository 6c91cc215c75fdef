"""The fast torch path: the reference's hand-written BPTT, in torch, with no autograd.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

For the book's model only (one RNN layer on one-hot input). Same equations as the reference's backward
pass (`network.backward`), arranged for speed:
  - the input projection W_xh[x_t] + b_h is gathered for all T steps at once;
  - the per-step loop does only what must be sequential: one matmul and the activation going forward,
    one matmul and one multiply going back, all in place in preallocated (T+1, B, H) buffers;
  - the output layer, the loss and the weight gradients are single large matmuls over all T*B rows.

With `matmul_dtype=torch.bfloat16` every matmul takes bf16 operands (AMX on recent x86 CPUs, tensor cores on
GPUs) while weights, states, gradients and every sum outside a matmul stay float32 (the master copy);
scoring (`token_nll`) runs the same forward pass.
"""
from __future__ import annotations

import torch

from . import masked_params
from .torch_backend import TorchBackend


class TorchFusedBackend(TorchBackend):
    name = "torch-fused"

    def __init__(self, params, activation="tanh", device="cpu", matmul_dtype=None):
        super().__init__(params, activation, device)
        self.activation = activation
        self.matmul_dtype = matmul_dtype if matmul_dtype is not None else self.dtype
        self.low_precision = self.matmul_dtype != self.dtype     # bf16 operands, float32 master copy
        self._buffers = {}

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b with operands in the matmul dtype and the result in the master dtype."""
        if not self.low_precision:
            return a @ b
        return (a.to(self.matmul_dtype) @ b.to(self.matmul_dtype)).to(self.dtype)

    def _buffer(self, name: str, shape, dtype=None) -> torch.Tensor:
        """A reusable work buffer: allocated once per shape, not once per minibatch."""
        dtype = dtype or self.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _shadow(self, name: str, shape) -> torch.Tensor | None:
        """A matmul-dtype copy of a buffer for bf16 operands; None when matmuls run in the master dtype."""
        return self._buffer(name, shape, self.matmul_dtype) if self.low_precision else None

    def _forward_states(self, p: dict, X: torch.Tensor, H0: torch.Tensor) -> torch.Tensor:
        """X (B, T) -> states (T+1, B, H) with states[0] = H0: the buffer the backward pass reads."""
        B, T = X.shape
        states = self._buffer("states", (T + 1, B, H0.shape[1]))
        states[0] = H0
        torch.add(p["W_xh"][X.T], p["b_h"], out=states[1:])          # input projection, all steps
        low = self._shadow("states_lp", states.shape)
        if low is not None:
            low[0].copy_(H0)
        W_hh = p["W_hh"].to(self.matmul_dtype)
        for t in range(1, T + 1):
            if low is None:
                states[t].addmm_(states[t - 1], W_hh)
            else:
                states[t] += low[t - 1] @ W_hh                       # bf16 operands, float32 sum
            if self.activation == "tanh":
                states[t].tanh_()
            else:
                states[t].relu_()
            if low is not None:
                low[t].copy_(states[t])
        return states

    def _head(self, p: dict, top: torch.Tensor, y: torch.Tensor):
        """The output layer and the mean loss over all T*B rows at once: top (T*B, H), y (T*B,) ->
        (loss as a 0-d tensor, {"W_hq", "b_q"} gradients, dL/dtop (T*B, H))."""
        logits = self._mm(top, p["W_hq"])
        logits += p["b_q"]
        log_p = torch.log_softmax(logits, dim=1)
        rows = torch.arange(len(y), device=self.device)
        loss = -log_p[rows, y].mean()
        dlogits = log_p.exp_()                                       # softmax, in place
        dlogits[rows, y] -= 1
        dlogits /= len(y)                                            # d mean / d logits
        grads = {"W_hq": self._mm(top.T, dlogits), "b_q": dlogits.sum(0)}
        return loss, grads, self._mm(dlogits, p["W_hq"].T)

    @torch.no_grad()        # not inference mode: the work buffers it fills are the training step's too
    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state (1, B, H): the
        training step's forward pass, in its matmul dtype, with no backward."""
        X, y = self._tensor(X), self._tensor(Y).T.reshape(-1)                  # y (T*B,) time-major
        states = self._forward_states(self.params, X, state[0])
        T, B, H = states.shape[0] - 1, states.shape[1], states.shape[2]
        logits = self._mm(states[1:].reshape(T * B, H), self.params["W_hq"]) + self.params["b_q"]
        nll = torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")
        return nll.cpu().numpy(), states[-1:].clone()

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """As the reference's; `state` is (1, B, H). The fused model has no dropout sites, so no masks;
        a weight-drop mask on W_hh is applied to a copy for this minibatch and to its gradient."""
        if masks is not None:
            raise ValueError("the fused path has no dropout sites")
        p = masked_params(self.params, weight_masks, lambda m, w: torch.as_tensor(m, dtype=w.dtype, device=w.device))
        X, y = self._tensor(X), self._tensor(Y).T.reshape(-1)        # y (T*B,) time-major
        states = self._forward_states(p, X, state[0])
        T, B, H = states.shape[0] - 1, states.shape[1], states.shape[2]
        # 1) output layer and loss over all T*B rows at once
        loss, grads, d_top = self._head(p, states[1:].reshape(T * B, H), y)
        # 2) back through time: dA_t = (dL/dH_t + dA_{t+1} W_hh^T) * phi'(a_t), in place in dA
        dA = d_top.view(T, B, H)                                     # dL/dH_t from the output layer
        dphi = self._buffer("dphi", (T, B, H))                         # phi'(a_t) from H_t, in place
        if self.activation == "tanh":
            torch.mul(states[1:], states[1:], out=dphi).neg_().add_(1)  # 1 - H_t^2
        else:
            torch.gt(states[1:], 0, out=dphi)                          # 1 where H_t > 0
        W_hh_T = p["W_hh"].T.to(self.matmul_dtype)
        low = self._shadow("dA_lp", dA.shape)
        for t in reversed(range(T)):
            if t < T - 1:
                if low is None:
                    dA[t].addmm_(dA[t + 1], W_hh_T)
                else:
                    dA[t] += low[t + 1] @ W_hh_T
            dA[t] *= dphi[t]
            if low is not None:
                low[t].copy_(dA[t])
        # 3) weight gradients as single matmuls over all steps
        dA_flat = dA.view(T * B, H)
        grads["W_hh"] = self._mm(states[:-1].reshape(T * B, H).T, dA_flat)
        grads["b_h"] = dA_flat.sum(0)
        grads["W_xh"] = torch.zeros_like(p["W_xh"]).index_add_(0, X.T.reshape(-1), dA_flat)
        for name, m in (weight_masks or {}).items():
            grads[name] *= torch.as_tensor(m, dtype=grads[name].dtype, device=grads[name].device)
        return float(loss), {k: grads[k] for k in p}, states[-1:].clone()
