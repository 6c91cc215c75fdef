"""The book's implementation, re-created as the benchmark baseline: what rnnlab's speed is measured against.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

Faithful to §8.5 (PyTorch): inputs one-hot encoded and multiplied by W_xh, a Python loop over time that also
applies the output layer at every step, `torch.cat` of the outputs, mean cross-entropy, autograd, the book's
`grad_clipping` (global norm with `torch.sqrt(sum(...))`, `p.grad[:] *= theta / norm`) and `sgd`
(`param -= lr * param.grad / batch_size; param.grad.zero_()` with batch_size=1); `predict_ch8` for
generation; and the book's data path (a Python list of token indices from `[vocab[t] for t in tokens]`).
Nothing is slowed down on purpose: this is the code as the book runs it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class BookRNN:
    """`RNNModelScratch` with the scratch `rnn`, `get_params` and `init_rnn_state`."""

    def __init__(self, params: dict[str, np.ndarray], device="cpu"):
        self.vocab_size = params["W_xh"].shape[0]
        self.params = [torch.tensor(params[k], device=device).requires_grad_(True)
                       for k in ("W_xh", "W_hh", "b_h", "W_hq", "b_q")]
        self.device = device

    def begin_state(self, batch_size):
        return (torch.zeros((batch_size, self.params[1].shape[0]), device=self.device),)

    def __call__(self, X, state):
        X = F.one_hot(X.T, self.vocab_size).type(torch.float32)     # (T, B, V)
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        H, = state
        outputs = []
        for X_t in X:
            H = torch.tanh(torch.mm(X_t, W_xh) + torch.mm(H, W_hh) + b_h)
            Y = torch.mm(H, W_hq) + b_q
            outputs.append(Y)
        return torch.cat(outputs, dim=0), (H,)


def grad_clipping(net: BookRNN, theta: float) -> None:
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in net.params))
    if norm > theta:
        for param in net.params:
            param.grad[:] *= theta / norm


def sgd(params, lr, batch_size) -> None:
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def train_step(net: BookRNN, X: torch.Tensor, Y: torch.Tensor, state, lr=1.0, theta=1.0):
    """One minibatch of the book's `train_epoch_ch8` (sequential partitioning: state detached)."""
    for s in state:
        s.detach_()
    y = Y.T.reshape(-1)
    y_hat, state = net(X, state)
    loss = F.cross_entropy(y_hat, y.long()).mean()
    loss.backward()
    grad_clipping(net, theta)
    sgd(net.params, lr, batch_size=1)
    return float(loss.detach()), state


def predict_ch8(prefix_ids: list[int], num_preds: int, net: BookRNN) -> list[int]:
    """The book's greedy generation: one call of the model per character, batch 1."""
    state = net.begin_state(batch_size=1)
    outputs = [prefix_ids[0]]

    def get_input():
        return torch.tensor([outputs[-1]], device=net.device).reshape((1, 1))

    with torch.no_grad():
        for y in prefix_ids[1:]:
            _, state = net(get_input(), state)
            outputs.append(y)
        for _ in range(num_preds):
            y, state = net(get_input(), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    return outputs


def encode_like_the_book(text: str, vocab) -> list[int]:
    """`load_corpus_time_machine`: characters looked up one by one into a Python list."""
    lines = text.split("\n")
    tokens = [list(line) for line in lines]
    return [vocab[token] for line in tokens for token in line]


def flops_per_token(V: int, H: int, gathered: bool = True) -> float:
    """Training FLOPs per token: forward, backward through time and weight gradients (multiply-adds x 2).

    With gathered inputs the W_xh term is a row lookup; the output layer costs 3 matmuls of H x V.
    """
    recurrent = 3 * 2 * H * H            # H W_hh forward, dA W_hh^T backward, dW_hh
    output = 3 * 2 * H * V               # logits, dW_hq, dH from the output layer
    inputs = 0 if gathered else 2 * 2 * V * H
    return float(recurrent + output + inputs)


def matmul_peak(B=32, H=512, dtype=torch.float32, seconds=0.5, columns: int | None = None) -> float:
    """Measured FLOP/s of a (B, H) @ (H, columns) matmul (columns: H, or G H for a cell of G gates), the shape
    of the recurrence (median of batches)."""
    from .bench import flop_rate
    columns = columns or H
    a, b = torch.randn(B, H).to(dtype), torch.randn(H, columns).to(dtype)
    return flop_rate(lambda: a @ b, 2 * B * H * columns, seconds, calls=50)
