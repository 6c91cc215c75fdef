"""The chapter's concise model on torch.nn's own recurrent layers (nn.RNN / nn.GRU / nn.LSTM; cuDNN on a GPU).

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens, I = a layer's input width,
E = embedding size, L = num_layers, S = state slices (L; 2L for the LSTM: every H, then every C), G = gates.

`RNNModel` is the book's concise `RNNModel` block: tokens (B, T) -> one-hot rows (or an nn.Embedding lookup)
-> the framework's recurrent layer -> an nn.Linear over Y.reshape(-1, H) -> logits (T*B, V), time-major.
It computes rnnlab's nn cell variant (`cells`, variant "nn": two biases per gate, the GRU's reset gate after
its recurrent matmul), which are torch.nn's equations; the two sides name the same numbers differently:

    rnnlab (per gate g, layer suffix s)         torch (per layer k, gates stacked by rows)
    W_x<g><s> (I, H)                            weight_ih_l<k> (G*H, I)   block of g, transposed
    W_h<g><s> (H, H)                            weight_hh_l<k> (G*H, H)   block of g, transposed
    b_<g><s> (H,), b_h<g><s> (H,)               bias_ih_l<k>, bias_hh_l<k> (G*H,)   block of g
    gate order rnn h; gru z r h; lstm i f o c   rnn h; gru r z n; lstm i f g o
    W_hq (H, V), b_q (V,)                       linear.weight (V, H) transposed, linear.bias (V,)
    W_emb (V, E)                                embedding.weight (V, E)

`to_state_dict` / `from_state_dict` convert between the two, with the state_dict keys of the standard concise
model (one multi-layer torch layer named `rnn`, `linear`, `embedding`), so a plain
`nn.LSTM(I, H, num_layers=L)` + `nn.Linear(H, V)` loads rnnlab's weights and rnnlab loads theirs.

Dropout: rnnlab draws its masks itself (from the run's seeded generator, so a resumed run draws the same
ones and every backend sees the same masks) and multiplies them in between layers and before the output
layer. A multi-layer torch layer cannot take masks from outside between its layers, so `RNNModel` holds one
single-layer nn module per depth and applies the caller's masks between them: every layer is still one
cuDNN call with its own flattened weights, and the masks are exactly the caller's.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import cells
from .torch_backend import TorchBackend, _device

TORCH_GATES = {"rnn": ("h",), "gru": ("r", "z", "h"), "lstm": ("i", "f", "c", "o")}   # rnnlab's gate letters
_LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_CELL_OF_GATES = {len(g): cell for cell, g in TORCH_GATES.items()}
_LAYER_KEY = re.compile(r"rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)")
_NOT_CUDNN_FLAT = "RNN module weights are not part of single contiguous chunk of memory"


class RNNModel(nn.Module):
    """The concise model: `forward(inputs (B, T) int, state (S, B, H), masks=None)` -> (logits (T*B, V)
    time-major, new state (S, B, H)); `masks` are (L, T, B, H) dropout masks, already scaled.

    `arch` is anything with cell, vocab_size, num_hiddens, num_layers and embed_size (a `cells.Arch`);
    `activation` (tanh or relu) is the RNN's nonlinearity. Without an embedding the input is the book's
    one-hot encoding (F.one_hot), whose matmul by weight_ih equals gathering its columns."""

    def __init__(self, arch, activation: str = "tanh", device=None, dtype=None):
        super().__init__()
        if arch.cell not in _LAYERS:
            raise ValueError(f"unknown cell {arch.cell!r}; choose from {', '.join(_LAYERS)}")
        if activation not in ("tanh", "relu"):
            raise ValueError(f"unknown activation {activation!r}; choose tanh or relu")
        self.cell, self.vocab_size, self.num_hiddens = arch.cell, arch.vocab_size, arch.num_hiddens
        self.num_layers, self.embed_size = arch.num_layers, arch.embed_size
        V, H, E = self.vocab_size, self.num_hiddens, self.embed_size
        kw = {"device": device, "dtype": dtype}
        extra = {"nonlinearity": activation} if self.cell == "rnn" else {}
        self.embedding = nn.Embedding(V, E, **kw) if E else None
        self.layers = nn.ModuleList(_LAYERS[self.cell](H if k else (E or V), H, **extra, **kw)
                                    for k in range(self.num_layers))
        self.linear = nn.Linear(H, V, **kw)
        self.flatten_parameters()

    @property
    def num_state_slices(self) -> int:
        return 2 * self.num_layers if self.cell == "lstm" else self.num_layers

    def flatten_parameters(self) -> None:
        """Pack each layer's weights into the one buffer cuDNN reads (a no-op on the CPU). It rebinds the
        parameters' storage: do it before taking views of them, not after."""
        for layer in self.layers:
            layer.flatten_parameters()

    def begin_state(self, batch_size: int, device=None) -> torch.Tensor:
        """Zeros (S, B, H) in rnnlab's layout: every layer's H, then (LSTM) every layer's C."""
        w = self.linear.weight
        return torch.zeros((self.num_state_slices, batch_size, self.num_hiddens), dtype=w.dtype,
                           device=w.device if device is None else device)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor, masks: torch.Tensor | None = None):
        X = inputs.T                                                    # (T, B): time-major, like the book
        if self.embedding is not None:
            x = self.embedding(X)                                       # (T, B, E)
        else:
            x = F.one_hot(X, self.vocab_size).to(self.linear.weight.dtype)   # (T, B, V)
        L, hs, cs = self.num_layers, [], []
        for k, layer in enumerate(self.layers):
            if self.cell == "lstm":
                x, (h, c) = layer(x, (state[k:k + 1], state[L + k:L + k + 1]))
                cs.append(c)
            else:
                x, h = layer(x, state[k:k + 1])
            hs.append(h)
            if masks is not None:
                x = x * masks[k]                                        # dropout above layer k
        logits = self.linear(x.reshape(-1, x.shape[-1]))                # (T*B, V)
        return logits, torch.cat(hs + cs)

    def load_standard_state_dict(self, state_dict: dict) -> None:
        """Load the standard concise model's state_dict (`rnn.weight_ih_l0`, ..., numpy arrays or tensors),
        copying into the existing parameters (their storage, hence cuDNN's flat buffers, stays put)."""
        ours = {_module_key(k): torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
                for k, v in state_dict.items()}
        self.load_state_dict(ours)

    def standard_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the standard concise model's keys (the inverse of the above)."""
        return {_standard_key(k): v for k, v in self.state_dict().items()}


def _module_key(key: str) -> str:
    """Standard key -> RNNModel's: rnn.weight_ih_l<k> is the single layer of module layers.<k>."""
    m = _LAYER_KEY.fullmatch(key)
    return f"layers.{m[2]}.{m[1]}_l0" if m else key


def _standard_key(key: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)_l0", key)
    return f"rnn.{m[2]}_l{m[1]}" if m else key


# ---- the weight layout, both ways ----

def _slots(arch: cells.Arch) -> dict[str, tuple[str, slice | None, bool]]:
    """rnnlab name -> (standard key, the rows of that tensor it occupies or None for all, transposed?), in
    rnnlab's canonical order. One table drives both conversions, the backend's views and its gradients."""
    H = arch.num_hiddens
    out = {"W_emb": ("embedding.weight", None, False)} if arch.embed_size else {}
    for k in range(arch.num_layers):
        by_gate = dict(zip(cells.GATES[arch.cell], cells.layer_names(arch.cell, k, "nn")))
        for g in cells.GATES[arch.cell]:
            rows = slice(TORCH_GATES[arch.cell].index(g) * H, (TORCH_GATES[arch.cell].index(g) + 1) * H)
            W_x, W_h, b, b_h = by_gate[g]
            out.update({W_x: (f"rnn.weight_ih_l{k}", rows, True), W_h: (f"rnn.weight_hh_l{k}", rows, True),
                        b: (f"rnn.bias_ih_l{k}", rows, False), b_h: (f"rnn.bias_hh_l{k}", rows, False)})
    out.update({"W_hq": ("linear.weight", None, True), "b_q": ("linear.bias", None, False)})
    return out


def _standard_shapes(arch: cells.Arch) -> dict[str, tuple[int, ...]]:
    V, H, E = arch.vocab_size, arch.num_hiddens, arch.embed_size
    GH = len(TORCH_GATES[arch.cell]) * H
    shapes = {"embedding.weight": (V, E)} if E else {}
    for k in range(arch.num_layers):
        shapes.update({f"rnn.weight_ih_l{k}": (GH, H if k else (E or V)), f"rnn.weight_hh_l{k}": (GH, H),
                       f"rnn.bias_ih_l{k}": (GH,), f"rnn.bias_hh_l{k}": (GH,)})
    shapes.update({"linear.weight": (V, H), "linear.bias": (V,)})
    return shapes


def _part(tensor, rows, transposed):
    """The piece of a standard tensor one rnnlab parameter is (a view, for numpy and torch alike)."""
    part = tensor if rows is None else tensor[rows]
    return part.T if transposed else part


def to_state_dict(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """rnnlab's nn-variant parameters -> the standard concise model's state_dict (new numpy arrays): keys
    `rnn.weight_ih_l<k>`, `rnn.weight_hh_l<k>`, `rnn.bias_ih_l<k>`, `rnn.bias_hh_l<k>` of one multi-layer
    torch layer with torch's gate orders, `linear.weight`, `linear.bias` and, with one, `embedding.weight`."""
    arch = cells.describe(params)
    if arch.variant != "nn":
        raise ValueError("torch.nn's layers compute the nn cell variant (two biases per gate); these are the "
                         "book's cells")
    first = np.asarray(params["W_hq"])
    out = {key: np.empty(shape, dtype=first.dtype) for key, shape in _standard_shapes(arch).items()}
    for name, (key, rows, transposed) in _slots(arch).items():
        _part(out[key], rows, transposed)[...] = params[name]
    return out


def from_state_dict(state_dict: dict, cell: str | None = None) -> dict[str, np.ndarray]:
    """The standard concise model's state_dict (numpy arrays or tensors) -> rnnlab's nn-variant parameters,
    by rnnlab name in canonical order (new arrays). The cell follows from the gate count of weight_hh_l0
    (1: rnn, 3: gru, 4: lstm); `cell`, when given, must agree. Layers without biases, projections or a
    second direction are not rnnlab models (ValueError)."""
    sd = {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in state_dict.items()}
    try:
        GH, H = sd["rnn.weight_hh_l0"].shape
        V = sd["linear.weight"].shape[0]
    except (KeyError, ValueError):
        raise ValueError("not a concise model's state_dict: rnn.weight_hh_l0 (G*H, H) and linear.weight "
                         "(V, H) are needed") from None
    found = _CELL_OF_GATES.get(GH // H) if H and GH % H == 0 else None
    if found is None or cell not in (None, found):
        raise ValueError(f"rnn.weight_hh_l0 is {GH}x{H}, which does not fit {cell or 'an rnn, gru or lstm'} "
                         f"with {H} hidden units")
    num_layers = 1
    while f"rnn.weight_ih_l{num_layers}" in sd:
        num_layers += 1
    E = sd["embedding.weight"].shape[1] if "embedding.weight" in sd else 0
    arch = cells.Arch(found, num_layers, E, V, H, "nn")
    shapes = _standard_shapes(arch)
    if set(sd) != set(shapes):
        missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
        raise ValueError(f"state_dict keys do not fit a {num_layers}-layer {found} with biases (missing: "
                         f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(unexpected[:4]) or 'none'})")
    for key, shape in shapes.items():
        if sd[key].shape != shape:
            raise ValueError(f"{key} is {list(sd[key].shape)}, expected {list(shape)}")
    return {name: np.array(_part(sd[key], rows, transposed), order="C")          # copies, never views
            for name, (key, rows, transposed) in _slots(arch).items()}


# ---- the backend ----

class TorchNNBackend(TorchBackend):
    """The rnnlab backend interface (see `backends`) over `RNNModel`, for nn-variant networks.

    The module owns the weights. `params`, what the shared optimizer reads, maps rnnlab's names to views
    into the module's parameters (a transposed block of rows for a gate's weight); `update(fn)` copies
    fn's new values into those views in place, under no_grad, so the parameters keep their storage and
    cuDNN's flattened weights stay valid (the module is flattened once, before the views are taken, and
    never moved afterwards). Gradients come from autograd on the module's parameters and are handed back
    as the same views of the gradient tensors, by rnnlab name.

    Weight drop runs the module with W_h * M in place of W_h through `torch.func.functional_call`: the loss
    is that of the masked weights, autograd's gradient w.r.t. W_h carries M, and the stored weights never
    change. `matmul_dtype="bfloat16"` runs the loss and scoring under torch.autocast; there torch's RNN and
    LSTM layers run wholly in bf16 (their states included), the GRU its matmuls only. Decoding stays in the
    weights' dtype. The input is always the one-hot encoding (`onehot_input` is accepted for the common
    interface: gathering rows gives the same numbers).
    """
    name = "torch-nn"

    def __init__(self, params: dict[str, np.ndarray], activation: str = "tanh", device: str = "cpu",
                 onehot_input: bool = False, matmul_dtype: str = "same"):
        self.arch = cells.describe(params)
        if self.arch.variant != "nn":
            raise ValueError("the torch-nn backend runs the nn cell variant only (two biases per gate, the "
                             "GRU's reset gate after its recurrent matmul)")
        if matmul_dtype not in ("same", "bfloat16"):
            raise ValueError(f"unknown matmul dtype {matmul_dtype!r}; choose same or bfloat16")
        self.device = _device(device)
        self.autocast = matmul_dtype == "bfloat16"
        self.activation, self.onehot_input = activation, onehot_input
        dtype = torch.from_numpy(np.zeros(0, dtype=np.asarray(params["W_hq"]).dtype)).dtype
        self.model = RNNModel(self.arch, activation, self.device, dtype)      # flattened on construction
        self.model.load_standard_state_dict(to_state_dict(params))
        self._modules = dict(self.model.named_parameters())                 # RNNModel key -> Parameter
        self._slots = {name: (_module_key(key), rows, transposed)
                       for name, (key, rows, transposed) in _slots(self.arch).items()}
        self.params = {name: _part(self._modules[key].detach(), rows, transposed)
                       for name, (key, rows, transposed) in self._slots.items()}

    def _masked_weights(self, weight_masks: dict | None) -> dict[str, torch.Tensor]:
        """{RNNModel key: W * M} for the tensors holding a masked parameter; M is 1 outside the masks."""
        if not weight_masks:
            return {}
        full = {}
        for name, mask in weight_masks.items():
            key, rows, transposed = self._slots[name]
            if key not in full:
                full[key] = torch.ones_like(self._modules[key], requires_grad=False)
            _part(full[key], rows, transposed).copy_(torch.as_tensor(mask))
        return {key: self._modules[key] * m for key, m in full.items()}

    def _run(self, X, state, masks=None, weights=None):
        """The module's forward, with `weights` (RNNModel key -> tensor) in place of its own when given."""
        if not weights:
            return self.model(X, state, masks)
        with warnings.catch_warnings():        # masked weights are fresh tensors, compacted for cuDNN per call
            warnings.filterwarnings("ignore", message=_NOT_CUDNN_FLAT)
            return functional_call(self.model, weights, (X, state, masks))

    def loss_and_grads(self, X, Y, state, masks=None, weight_masks=None):
        """Mean loss over the T*B predictions, gradients by rnnlab name, and the detached final state."""
        X, y = self._tensor(X), self._tensor(Y).T.reshape(-1)                # y (T*B,) time-major
        leaves = list(self._modules.values())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, new_state = self._run(X, state, self._masks(masks), self._masked_weights(weight_masks))
        loss = F.cross_entropy(logits.to(self.dtype), y)
        grads = dict(zip(self._modules, torch.autograd.grad(loss, leaves)))
        named = {name: _part(grads[key], rows, transposed) for name, (key, rows, transposed) in self._slots.items()}
        return float(loss.detach()), named, new_state.detach().to(self.dtype)

    @torch.inference_mode()
    def token_nll(self, X, Y, state):
        """Per-prediction NLL (T*B,) as float64 numpy, time-major, and the final state (S, B, H); no
        gradients, the training loss's matmul dtype."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, new_state = self.model(self._tensor(X), state)
        nll = F.cross_entropy(logits.double(), self._tensor(Y).T.reshape(-1), reduction="none")
        return nll.cpu().numpy(), new_state.to(self.dtype)

    @torch.inference_mode()
    def step(self, token_ids, state):
        logits, new_state = self.model(self._tensor(token_ids).reshape(-1, 1), state)
        return logits.cpu().numpy(), new_state

    def update(self, fn) -> None:
        """The parameters become fn(parameters), copied into the module's own storage."""
        new = dict(fn(self.params))
        if set(new) != set(self.params):
            raise ValueError("an update must return every parameter, by name, and no other")
        with torch.no_grad():
            for name, view in self.params.items():
                if new[name] is not view:
                    view.copy_(new[name])
