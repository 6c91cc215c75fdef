"""The fast torch path for stacks of RNN, GRU and LSTM cells: hand-written BPTT, no autograd.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, I = a layer's input width,
G = gates per cell (1, 3, 4), L = num_layers, S = state slices (L; 2L for the LSTM).

The reference's equations (`cells.step`, `cells.step_backward`, `network.backward`), arranged for speed the way
the book RNN's fused path (`torch_fused`) arranges them, layer by layer:
  - the input projection of all T steps (embedding rows or the layer below's outputs, @ W_x + b) is one
    matmul, or a gather of W_x's rows for one-hot input, written into the layer's (T, B, G*H) gate buffer;
  - the per-step loop does only what is sequential: the recurrent matmul added in place into that step's
    gates, the activations in place, the new state into a preallocated (T+1, B, H) buffer;
  - the gate derivatives that do not depend on the incoming gradient are computed for all steps at once after
    the forward pass, so the backward loop is a matmul and a few multiplies per step;
  - the weight gradients, the gradient to the layer below and the output layer are single matmuls over all
    T*B rows.
Dropout masks (between layers, before the output layer) and weight-drop masks (on W_h*) are the reference's.
With `matmul_dtype=torch.bfloat16` every matmul takes bf16 operands and gives a bf16-rounded product, as
torch.autocast's do; weights, states, gradients and every sum outside a matmul are float32 (the master copy).

Inside the LSTM the gates are laid out (o, i, f, c) rather than the parameters' (i, f, o, c): the three
sigmoid gates are then adjacent, and so are the three that the cell-state gradient scales (i, f, c), so each
is one op per step. This path runs the book variant of every cell (one bias per gate; the GRU's reset gate
before its recurrent matmul); the nn variant runs on torch.nn's layers (`torch_nn`).
"""
from __future__ import annotations

import torch

from .. import cells
from . import masked_params
from .torch_fused import TorchFusedBackend

ORDER = {"rnn": ("h",), "gru": ("z", "r", "h"), "lstm": ("o", "i", "f", "c")}     # gate layout in a buffer


def _tanh(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """tanh(a) as 2 sig(2a) - 1, in place (or into `out`): torch's CPU sigmoid is several times faster than its
    tanh, and four cheap ops on a (B, H) slice cost less than one tanh."""
    out = a if out is None else out
    return torch.mul(a, 2, out=out).sigmoid_().mul_(2).sub_(1)


class TorchGatedBackend(TorchFusedBackend):
    name = "torch-fused"

    def __init__(self, params, activation="tanh", device="cpu", matmul_dtype=None):
        super().__init__(params, activation, device, matmul_dtype)
        if self.arch.variant != "book":
            raise ValueError("the fused path runs the book variant of each cell")

    # ---- weights, in this path's gate layout ----

    def _names(self, layer: int) -> list[tuple[str, str, str]]:
        """(W_x*, W_h*, b_*) names of one layer's gates, in ORDER."""
        by_gate = dict(zip(cells.GATES[self.arch.cell], cells.layer_names(self.arch.cell, layer)))
        return [by_gate[g] for g in ORDER[self.arch.cell]]

    def _layer(self, p: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_x (I, G*H), W_h (H, G*H), b (G*H,) of one layer, gates in ORDER."""
        names = self._names(layer)
        return (torch.cat([p[n[0]] for n in names], 1), torch.cat([p[n[1]] for n in names], 1),
                torch.cat([p[n[2]] for n in names]))

    def _split(self, layer: int, dW_x, dW_h, db) -> dict:
        """Gradients of one layer in ORDER's layout -> per-gate parameter names."""
        H = self.arch.num_hiddens
        out = {}
        for k, names in enumerate(self._names(layer)):
            cols = slice(k * H, (k + 1) * H)
            out.update({names[0]: dW_x[:, cols].contiguous(), names[1]: dW_h[:, cols].contiguous(),
                        names[2]: db[cols].contiguous()})
        return out

    def _lowered(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """A matmul-dtype shadow of a work buffer, filled step by step as the loop finishes each row: the
        next step's matmul and the weight-gradient matmuls read it without converting again. The buffer
        itself when matmuls run in the master dtype."""
        return full if not self.low_precision else self._buffer(name, full.shape, self.matmul_dtype)

    def _low(self, W: torch.Tensor) -> torch.Tensor:
        """A weight as the recurrent loop multiplies by it: in the matmul dtype, contiguous."""
        return W.to(self.matmul_dtype).contiguous()

    def _into(self, out: torch.Tensor, a: torch.Tensor, W_low: torch.Tensor) -> torch.Tensor:
        """out = a @ W, as `_acc` computes it."""
        if not self.low_precision:
            return torch.mm(a, W_low, out=out)
        return out.copy_(a.to(self.matmul_dtype) @ W_low)

    def _acc(self, out: torch.Tensor, a: torch.Tensor, W_low: torch.Tensor) -> torch.Tensor:
        """out += a @ W in place, with `a` cast to the matmul dtype (W_low already is): in bf16 the product
        is rounded to bf16, then added to the float32 `out`."""
        if not self.low_precision:
            return out.addmm_(a, W_low)
        out += (a.to(self.matmul_dtype) @ W_low).to(self.dtype)
        return out

    # ---- forward ----

    def _forward(self, p: dict, X: torch.Tensor, state: torch.Tensor, masks=None):
        """X (B, T) token ids, state (S, B, H) -> top (T, B, H) (the last layer's outputs, dropped out), the
        final state (S, B, H) and one cache per layer for the backward pass."""
        arch, (B, T) = self.arch, X.shape
        Xt = X.T                                                          # (T, B) time-major
        inputs = p["W_emb"][Xt] if arch.embed_size else None             # (T, B, E)
        caches, finals = [], []
        for layer in range(arch.num_layers):
            W_x, W_h, b = self._layer(p, layer)
            G = self._buffer(f"gates{layer}", (T, B, W_h.shape[1]))
            if inputs is None:
                torch.add(W_x[Xt], b, out=G)                              # one-hot rows, gathered
            else:
                torch.add(self._mm(inputs.reshape(T * B, -1), W_x), b, out=G.view(T * B, -1))
            H0 = state[layer]
            C0 = state[arch.num_layers + layer] if arch.cell == "lstm" else None
            cache = getattr(self, f"_{arch.cell}_forward")(layer, G, W_h, H0, C0)
            cache.update(inputs=inputs, W_x=W_x, W_h=W_h, G=G)
            caches.append(cache)
            finals.append(cache["Hs"][T])
            out = cache["Hs"][1:]
            inputs = out * masks[layer] if masks is not None else out
        finals += [c["Cs"][T] for c in caches if "Cs" in c]
        return inputs, torch.stack(finals), caches

    def _rnn_forward(self, layer, G, W_h, H0, C0):
        """H_t = phi(XW_t + H_{t-1} W_h): the pre-activations in place in G, the states into Hs after H0."""
        T, B, H = G.shape
        Hs = self._buffer(f"H{layer}", (T + 1, B, H))
        Hs[0] = H0
        W = self._low(W_h)
        for t in range(T):
            a = self._acc(G[t], Hs[t], W)
            if self.activation == "tanh":
                torch.tanh(a, out=Hs[t + 1])
            else:
                torch.clamp(a, min=0, out=Hs[t + 1])
        return {"Hs": Hs}

    def _gru_forward(self, layer, G, W_h, H0, C0):
        """Z, R = sig(XW + H W_h[z, r]); H~ = tanh(XW_h + (R * H) W_hh); H_t = H~ + Z * (H - H~). G ends
        holding Z, R, H~ for every step; RH (T, B, H) holds R * H_{t-1}, which W_hh's gradient needs."""
        T, B, GH = G.shape
        H = GH // 3
        Hs = self._buffer(f"H{layer}", (T + 1, B, H))
        RH = self._buffer(f"RH{layer}", (T, B, H))
        Hs[0] = H0
        W_zr, W_hh = self._low(W_h[:, :2 * H]), self._low(W_h[:, 2 * H:])
        for t in range(T):
            g = G[t]
            self._acc(g[:, :2 * H], Hs[t], W_zr).sigmoid_()                # Z, R
            torch.mul(g[:, H:2 * H], Hs[t], out=RH[t])
            H_tilde = _tanh(self._acc(g[:, 2 * H:], RH[t], W_hh))
            torch.sub(Hs[t], H_tilde, out=Hs[t + 1]).mul_(g[:, :H]).add_(H_tilde)
        return {"Hs": Hs, "RH": RH}

    def _lstm_forward(self, layer, G, W_h, H0, C0):
        """Gates (o, i, f, c~) = (sig, sig, sig, tanh)(XW + H W_h); C_t = f C + i c~; H_t = o tanh(C_t).
        G ends holding the activated gates; tanh(C_t) is kept for the backward pass."""
        T, B, GH = G.shape
        H = GH // 4
        Hs = self._buffer(f"H{layer}", (T + 1, B, H))
        Hs_low = self._lowered(f"H{layer}_low", Hs)
        Cs = self._buffer(f"C{layer}", (T + 1, B, H))
        tanh_C = self._buffer(f"tanhC{layer}", (T, B, H))
        Hs[0], Cs[0] = H0, C0
        if Hs_low is not Hs:
            Hs_low[0].copy_(H0)
        W = self._low(W_h)
        for t in range(T):
            g = self._acc(G[t], Hs_low[t], W)
            g[:, 3 * H:] *= 2                          # tanh(a) = 2 sig(2a) - 1: one sigmoid for all gates
            g.sigmoid_()
            g[:, 3 * H:].mul_(2).sub_(1)
            torch.mul(g[:, 2 * H:3 * H], Cs[t], out=Cs[t + 1]).addcmul_(g[:, H:2 * H], g[:, 3 * H:])
            _tanh(Cs[t + 1], out=tanh_C[t])
            torch.mul(g[:, :H], tanh_C[t], out=Hs[t + 1])
            if Hs_low is not Hs:
                Hs_low[t + 1].copy_(Hs[t + 1])
        return {"Hs": Hs, "Hs_low": Hs_low, "Cs": Cs, "tanh_C": tanh_C}

    # ---- backward through time, one layer ----

    def _rnn_backward(self, c: dict, d_out: torch.Tensor, W_h_T):
        """d_out (T, B, H), dL/dH_t from above -> dA (T, B, H), in place in d_out."""
        Hs, T = c["Hs"], d_out.shape[0]
        dphi = 1 - Hs[1:] * Hs[1:] if self.activation == "tanh" else (Hs[1:] > 0).to(self.dtype)
        for t in reversed(range(T)):
            if t < T - 1:
                self._acc(d_out[t], d_out[t + 1], W_h_T)
            d_out[t] *= dphi[t]
        return d_out, d_out

    def _gru_backward(self, c: dict, d_out: torch.Tensor, W_h_T):
        """d_out (T, B, H) -> dA (T, B, 3H), the gradient w.r.t. the gates' pre-activations (z, r, h)."""
        G, Hs = c["G"], c["Hs"]
        T, B, GH = G.shape
        H = GH // 3
        Z, R, H_tilde, H_prev = G[..., :H], G[..., H:2 * H], G[..., 2 * H:], Hs[:-1]
        P = self._buffer("P", (T, B, GH))                                  # what dH (z, h) or dRH (r) scales
        torch.mul(H_prev - H_tilde, Z * (1 - Z), out=P[..., :H])
        torch.mul(H_prev, R * (1 - R), out=P[..., H:2 * H])
        torch.mul(1 - Z, 1 - H_tilde * H_tilde, out=P[..., 2 * H:])
        dA = self._buffer("dA", (T, B, GH))
        carry, dRH = self._buffer("carry", (B, H)), self._buffer("dRH", (B, H))
        W_zr_T, W_hh_T = W_h_T[:2 * H].contiguous(), W_h_T[2 * H:].contiguous()
        for t in reversed(range(T)):
            dH = d_out[t]
            if t < T - 1:
                dH += carry
            torch.mul(dH, P[t, :, :H], out=dA[t, :, :H])
            torch.mul(dH, P[t, :, 2 * H:], out=dA[t, :, 2 * H:])
            self._into(dRH, dA[t, :, 2 * H:], W_hh_T)                      # dL/d(R * H_{t-1})
            torch.mul(dRH, P[t, :, H:2 * H], out=dA[t, :, H:2 * H])
            if t > 0:
                torch.mul(dH, Z[t], out=carry).addcmul_(dRH, R[t])
                self._acc(carry, dA[t, :, :2 * H], W_zr_T)
        return dA, dA

    def _lstm_backward(self, c: dict, d_out: torch.Tensor, W_h_T):
        """d_out (T, B, H) -> dA (T, B, 4H), the gradient w.r.t. the gates' pre-activations (o, i, f, c)."""
        G, Cs, tanh_C = c["G"], c["Cs"], c["tanh_C"]
        T, B, GH = G.shape
        H = GH // 4
        O, I, F, C_tilde = G[..., :H], G[..., H:2 * H], G[..., 2 * H:3 * H], G[..., 3 * H:]
        P = self._buffer("P", (T, B, GH))                 # what dH (o) or dC (i, f, c) scales
        torch.mul(tanh_C, O * (1 - O), out=P[..., :H])
        torch.mul(C_tilde, I * (1 - I), out=P[..., H:2 * H])
        torch.mul(Cs[:-1], F * (1 - F), out=P[..., 2 * H:3 * H])
        torch.mul(I, 1 - C_tilde * C_tilde, out=P[..., 3 * H:])
        Q = O * (1 - tanh_C * tanh_C)                      # dC_t / dH_t
        dA = self._buffer("dA", (T, B, GH))
        dA_low = self._lowered("dA_low", dA)
        dC = self._buffer("dC", (B, H))
        for t in reversed(range(T)):
            dH = d_out[t]
            if t < T - 1:
                self._acc(dH, dA_low[t + 1], W_h_T)
                dC.mul_(F[t + 1]).addcmul_(dH, Q[t])
            else:
                torch.mul(dH, Q[t], out=dC)
            torch.mul(dH, P[t, :, :H], out=dA[t, :, :H])
            torch.mul(P[t, :, H:].view(B, 3, H), dC.unsqueeze(1), out=dA[t, :, H:].view(B, 3, H))
            if dA_low is not dA:
                dA_low[t].copy_(dA[t])
        return dA, dA_low

    # ---- the backend interface ----

    @torch.no_grad()        # not inference mode: the work buffers it fills are the training step's too
    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state (S, B, H): the
        training step's forward pass, in its matmul dtype, with no backward."""
        X, y = self._tensor(X), self._tensor(Y).T.reshape(-1)
        top, new_state, _ = self._forward(self.params, X, state)
        logits = self._mm(top.reshape(-1, top.shape[-1]), self.params["W_hq"]) + self.params["b_q"]
        nll = torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")
        return nll.cpu().numpy(), new_state

    @torch.no_grad()
    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """As the reference's: mean loss, gradients of every parameter and the final state (S, B, H).
        `masks` (L, T, B, H) are dropout masks; a weight-drop mask multiplies its W_h* for this minibatch
        (a copy) and its gradient."""
        arch = self.arch
        p = masked_params(self.params, weight_masks, lambda m, w: torch.as_tensor(m, dtype=w.dtype, device=w.device))
        X, y = self._tensor(X), self._tensor(Y).T.reshape(-1)                  # y (T*B,) time-major
        masks = self._masks(masks)
        top, new_state, caches = self._forward(p, X, state, masks)
        T, B, H = top.shape
        loss, grads, d_top = self._head(p, top.reshape(T * B, H), y)
        d_out = d_top.view(T, B, H)
        Xt = X.T.reshape(-1)
        for layer in reversed(range(arch.num_layers)):
            c = caches[layer]
            if masks is not None:
                d_out *= masks[layer]
            dA, dA_low = getattr(self, f"_{arch.cell}_backward")(c, d_out, self._low(c["W_h"].T))
            dA_flat, dA_low = dA.view(T * B, -1), dA_low.view(T * B, -1)     # (T*B, G*H); for matmuls
            dW_h = self._recurrent_grad(c, dA_low)
            if c["inputs"] is None:                                            # one-hot rows: scatter-add
                dW_x = torch.zeros_like(c["W_x"]).index_add_(0, Xt, dA_flat)
            else:
                inputs = c["inputs"].reshape(T * B, -1)
                dW_x = self._mm(inputs.T, dA_low)
                d_out = self._mm(dA_low, c["W_x"].T).view(T, B, -1)          # to the layer below
            grads.update(self._split(layer, dW_x, dW_h, dA_flat.sum(0)))
        if arch.embed_size:
            grads["W_emb"] = torch.zeros_like(p["W_emb"]).index_add_(0, Xt, d_out.reshape(T * B, -1))
        for name, m in (weight_masks or {}).items():
            grads[name] *= torch.as_tensor(m, dtype=grads[name].dtype, device=grads[name].device)
        return float(loss), {k: grads[k] for k in p}, new_state

    def _recurrent_grad(self, c: dict, dA_flat: torch.Tensor) -> torch.Tensor:
        """dW_h (H, G*H) as matmuls over all T*B rows: H_{t-1}^T dA, except the GRU candidate's columns,
        which see R * H_{t-1}."""
        Hs = c.get("Hs_low", c["Hs"])
        T1, B, H = Hs.shape
        H_prev = Hs[:-1].reshape((T1 - 1) * B, H)
        if self.arch.cell != "gru":
            return self._mm(H_prev.T, dA_flat)
        return torch.cat([self._mm(H_prev.T, dA_flat[:, :2 * H]),
                          self._mm(c["RH"].reshape(-1, H).T, dA_flat[:, 2 * H:])], 1)
