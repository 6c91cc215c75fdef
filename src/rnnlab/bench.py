"""`rnnlab bench`: speed measured side by side in one process, as ratios to the book's implementation.

Shape legend: B = batch_size, T = num_steps, V = vocab_size, H = num_hiddens.

Every path trains on the same minibatches from the same weights. Each is warmed up, then timed over several
repeats; the median is reported with its ratio to the baseline (`bench_book`: the book's one-hot, autograd,
Python-loop step). Generation is timed against the book's `predict_ch8`, data encoding against its list
path. The roofline is a measured matmul peak divided by the FLOPs a training token needs.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from . import cells, corpora, optim, text
from .config import DataConfig, ModelConfig
from .lm import LM


@dataclass(frozen=True)
class BenchConfig:
    name: str
    token: str
    batch_size: int
    num_steps: int
    num_hiddens: int
    cell: str = "rnn"
    num_layers: int = 1
    embed_size: int = 0


CONFIGS = {c.name: c for c in (
    BenchConfig("book", "char", 32, 35, 512),
    BenchConfig("big", "char", 128, 35, 1024),
    BenchConfig("word", "word", 32, 35, 512),
    BenchConfig("lstm", "char", 32, 64, 384, cell="lstm", num_layers=2, embed_size=64),
)}
GATES = {"rnn": 1, "gru": 3, "lstm": 4}      # G: matrices of H columns per weight (one per gate)


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}    # torch's CPU threads: spin or sleep
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except ImportError:
        info["torch"] = None
    return info


def timed(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _corpus(token: str, data_dir=None):
    raw = corpora.read_text(corpora.locate("timemachine", data_dir))
    return text.load_corpus(raw, "d2l", token)


def _batches(corpus, cfg: BenchConfig, n: int = 8):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(corpus) - cfg.num_steps - 1, (n, cfg.batch_size))
    steps = np.arange(cfg.num_steps)
    return [(corpus[s[:, None] + steps].astype(np.int64), corpus[s[:, None] + steps + 1].astype(np.int64))
            for s in starts]


def training_paths(params, device: str, compile: bool = True):
    """name -> a backend (or the book's model) built on `params`; torch paths only when torch is present,
    the jax path only when JAX is.

    `compile` adds the torch.compile path, whose first step compiles for tens of seconds. The nn path
    (torch.nn.RNN, cuDNN on a GPU) runs the nn cell variant: the same weights plus a zero second bias."""
    from .backends import jax_available, make_backend
    from .backends.numpy_backend import NumpyBackend
    paths = {"numpy (reference)": NumpyBackend(params)}
    if jax_available():
        paths["jax"] = make_backend("jax", params, device=device)
    try:
        import torch

        from . import bench_book
        from .backends.torch_backend import TorchBackend
        from .backends.torch_compiled import TorchCompiledBackend
        from .backends.torch_fused import TorchFusedBackend
    except ImportError:
        return {}, paths
    baseline = {"book (baseline)": bench_book.BookRNN(params, device)}
    paths.update({"torch autograd": TorchBackend(params, device=device),
                  "torch nn": make_backend("torch", with_second_bias(params), device=device, torch_impl="nn"),
                  "torch fused f32": TorchFusedBackend(params, device=device),
                  "torch fused bf16": TorchFusedBackend(params, device=device, matmul_dtype=torch.bfloat16)})
    if compile:
        paths["torch compile f32"] = TorchCompiledBackend(params, device=device)
    return baseline, paths


def with_second_bias(params: dict) -> dict:
    """The book's RNN parameters as the nn variant's: the same weights and a zero recurrent-side bias."""
    nn_params = {**params, "b_hh": np.zeros_like(params["b_h"])}
    return {name: nn_params[name] for name in cells.canonical_order(nn_params)}


def _train_fn(model, batches):
    """One call trains on every batch once: the book's step for the baseline, rnnlab's loop otherwise."""
    if hasattr(model, "loss_and_grads"):
        def run():
            state = model.begin_state(batches[0][0].shape[0])
            for X, Y in batches:
                _, grads, state = model.loss_and_grads(X, Y, state)
                grads, _, _ = optim.clip_grad_norm(grads, 1.0)
                model.update(lambda params: optim.sgd(params, grads, 1.0))
        return run
    import torch

    from . import bench_book
    tensors = [(torch.as_tensor(X, device=model.device), torch.as_tensor(Y, device=model.device))
               for X, Y in batches]

    def run_book():
        state = model.begin_state(tensors[0][0].shape[0])
        for X, Y in tensors:
            _, state = bench_book.train_step(model, X, Y, state)
    return run_book


def gated_paths(cfg: BenchConfig, vocab_size: int, device: str, compile: bool = True):
    """For a GRU/LSTM stack: ({}, name -> backend), every path that trains it, on the same weights (the nn path
    on the nn cell variant's, of the same shapes). There is no book baseline: the ratios are to torch
    autograd."""
    from .backends import jax_available, make_backend
    def make(variant: str = "book") -> dict:            # seed 0 every time: the same weights
        return cells.init_params(vocab_size, cfg.num_hiddens, np.random.default_rng(0), np.dtype("float32"),
                                 cfg.cell, cfg.num_layers, cfg.embed_size, cell_variant=variant)
    params, paths = make(), {}
    try:
        import torch  # noqa: F401
        paths = {"torch autograd": make_backend("torch", params, device=device, torch_impl="autograd"),
                 "torch autograd bf16": make_backend("torch", params, device=device, torch_impl="autograd",
                                                     matmul_dtype="bfloat16"),
                 "torch nn": make_backend("torch", make("nn"), device=device, torch_impl="nn"),
                 "torch fused f32": make_backend("torch", params, device=device, torch_impl="fused"),
                 "torch fused bf16": make_backend("torch", params, device=device, torch_impl="fused",
                                                   matmul_dtype="bfloat16")}
        if compile:
            paths["torch compile f32"] = make_backend("torch", params, device=device, torch_impl="compile")
    except ImportError:
        pass
    if jax_available():
        paths["jax"] = make_backend("jax", params, device=device)
    return {}, paths


def bench_training(cfg: BenchConfig, device="cpu", warmup=1, repeats=3, num_batches=4, data_dir=None,
                   compile=True) -> dict:
    """Training tokens/s of every path on the same batches; `first_call_s` is the first (cold) call. The
    ratios are to the book's step, or for a gated model to torch autograd."""
    corpus, vocab = _corpus(cfg.token, data_dir)
    batches = _batches(corpus, cfg, num_batches)
    if cfg.cell == "rnn":
        params = cells.init_params(len(vocab), cfg.num_hiddens, np.random.default_rng(0))
        baseline, paths = training_paths(params, device, compile)
    else:
        baseline, paths = gated_paths(cfg, len(vocab), device, compile)
    tokens = num_batches * cfg.batch_size * cfg.num_steps
    rows = {}
    for name, model in {**baseline, **paths}.items():
        if name.startswith("numpy") and cfg.name != "book":
            continue                                    # the reference is for teaching, not big shapes
        fn = _train_fn(model, batches)
        first = timed(fn, 0, 1)                         # the first call counts as one warm-up
        seconds = timed(fn, max(warmup - 1, 0), repeats)
        rows[name] = {"tokens_per_s": tokens / seconds, "first_call_s": first}
    against = "book (baseline)" if cfg.cell == "rnn" else "torch autograd"
    base = rows.get(against, {}).get("tokens_per_s")
    for row in rows.values():
        row["ratio"] = row["tokens_per_s"] / base if base else None
    return {"config": {"B": cfg.batch_size, "T": cfg.num_steps, "V": len(vocab), "H": cfg.num_hiddens,
                       "token": cfg.token, "dtype": "float32 master weights", "device": device,
                       "cell": cfg.cell, "layers": cfg.num_layers, "E": cfg.embed_size},
            "paths": rows, "ratios_to": against}


def generation_matmuls(cfg: BenchConfig, vocab_size: int) -> list[tuple[int, int, int]]:
    """The matmuls of one decoding step, per continuation, as (inputs, columns, how many): those the numpy
    decoder runs. Layer 1's input projection is a row of a precomputed table, so per layer there is the
    recurrence (H, G H), above the first layer the input projection (H, G H), and on top the output layer
    (H, V)."""
    H, G = cfg.num_hiddens, GATES[cfg.cell]
    return [(H, G * H, 2 * cfg.num_layers - 1), (H, vocab_size, 1)]


def flop_rate(fn, flops: float, seconds: float, calls: int) -> float:
    """Measured FLOP/s of `fn()`, which does `flops` floating-point operations: `calls` calls to warm up, then
    the median over batches of `calls` calls for about `seconds` (one batch at least)."""
    for _ in range(calls):
        fn()
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or not rates:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(calls * flops / (time.perf_counter() - start))
    return float(np.median(rates))


def numpy_matmul_rate(B: int, K: int, N: int, seconds: float = 0.2) -> float:
    """Measured FLOP/s of a float32 (B, K) @ (K, N) product with numpy (what the numpy decoder runs), into a
    preallocated result."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((B, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    out = np.empty((B, N), np.float32)
    return flop_rate(lambda: np.dot(a, b, out=out), 2 * B * K * N, seconds, max(1, int(2e6 // (B * K * N))))


def generation_roofline(cfg: BenchConfig, vocab_size: int, B: int, seconds: float = 0.2, rates=None) -> dict:
    """The float32 bound on decoding steps/s for B continuations at once: a step's matmuls
    (`generation_matmuls`), each at the matmul rate measured at its shape, (B, K) @ (K, N): the better of
    numpy and torch (`bench_book.matmul_peak`). `rates` caches the rates by shape."""
    rates = {} if rates is None else rates
    step_seconds, flops, gflops = 0.0, 0.0, {}
    for K, N, count in generation_matmuls(cfg, vocab_size):
        if (B, K, N) not in rates:
            rate = numpy_matmul_rate(B, K, N, seconds)
            try:
                from . import bench_book
                rate = max(rate, bench_book.matmul_peak(B, K, seconds=seconds, columns=N))
            except ImportError:
                pass
            rates[B, K, N] = rate
        step_seconds += count * 2 * B * K * N / rates[B, K, N]
        flops += count * 2 * K * N
        gflops[f"{B}x{K} @ {K}x{N}"] = rates[B, K, N] / 1e9
    return {"flops_per_char": flops, "matmul_gflops": gflops, "steps_per_s": 1 / step_seconds}


GENERATION_MODELS = {"book": CONFIGS["book"], "lstm": CONFIGS["lstm"]}


def bench_generation(num_chars=200, warmup=1, repeats=3, data_dir=None, peak_seconds=0.2) -> dict:
    """chars/s (all rows counted) of decoding as `rnnlab generate` runs it, through `LM` and the numpy
    backend: the book config (one RNN layer, H=512) greedy and sampled, one continuation or 64 at once, and
    beam search, then the bench's lstm config (2 layers, H=384, E=64); ratios to the book's `predict_ch8`.
    With JAX installed, each greedy row has a twin on the jax backend, whose greedy loop is compiled whole
    (its first call compiles, untimed). Every rnnlab row has its roofline (`generation_roofline`, at its
    number of rows) and the rate as a fraction of it. The matmul peaks are measured before and after the
    decoding is timed and the better of the two is taken, so that a slow moment of a shared machine does not
    lower the bound and make a fraction look high."""
    _, vocab = _corpus("char", data_dir)
    V = len(vocab)
    book_params = cells.init_params(V, 512, np.random.default_rng(0))
    prefix = vocab[list("time traveller")]
    rows = {}
    try:
        from . import bench_book
        book = bench_book.BookRNN(book_params)
        seconds = timed(lambda: bench_book.predict_ch8(prefix, num_chars, book), warmup, repeats)
        rows["book predict_ch8 (greedy, batch 1)"] = {"chars_per_s": num_chars / seconds}
    except ImportError:
        pass
    from .backends import jax_available
    from .backends.numpy_backend import NumpyBackend
    lstm = CONFIGS["lstm"]
    lstm_params = cells.init_params(V, lstm.num_hiddens, np.random.default_rng(0), np.float32, "lstm",
                                    lstm.num_layers, lstm.embed_size, init="uniform")
    lstm_cfg = ModelConfig(cell="lstm", num_hiddens=lstm.num_hiddens, num_layers=lstm.num_layers,
                           embed_size=lstm.embed_size)
    models = {"book": LM(NumpyBackend(book_params), vocab, DataConfig(), ModelConfig()),
              "lstm": LM(NumpyBackend(lstm_params), vocab, DataConfig(), lstm_cfg)}
    greedy = {"temperature": 0.0}
    sampled, many = {"temperature": 1.0}, {"temperature": 1.0, "num_samples": 64}
    # (label, model, continuations decoded at once, chars counted per step, decoding options)
    cases = [("rnnlab greedy, batch 1", "book", 1, 1, greedy),
             ("rnnlab sampled, batch 1", "book", 1, 1, sampled),
             ("rnnlab sampled, 64 at once", "book", 64, 64, many),
             ("rnnlab top-k 10 top-p .9, 64", "book", 64, 64, {**many, "top_k": 10, "top_p": 0.9}),
             ("rnnlab beam search, 8 beams", "book", 8, 1, {"beam": 8}),
             ("lstm greedy, batch 1", "lstm", 1, 1, greedy),
             ("lstm sampled, 64 at once", "lstm", 64, 64, many)]
    if jax_available():                                 # the jax backend's compiled greedy loop
        from .backends.jax_backend import JaxBackend
        models["book jax"] = LM(JaxBackend(book_params), vocab, DataConfig(), ModelConfig())
        models["lstm jax"] = LM(JaxBackend(lstm_params), vocab, DataConfig(), lstm_cfg)
        cases[1:1] = [("rnnlab greedy, batch 1, jax loop", "book jax", 1, 1, greedy)]
        cases.append(("lstm greedy, batch 1, jax loop", "lstm jax", 1, 1, greedy))
    shapes = {name: GENERATION_MODELS[name.split()[0]] for name in models}      # "lstm jax" is the lstm

    def peaks() -> dict:
        rates: dict = {}
        for _, name, batch, _, _ in cases:
            generation_roofline(shapes[name], V, batch, peak_seconds, rates)
        return rates

    before = peaks()                                    # the matmul peaks, measured before and after the timing
    for label, name, batch, counted, options in cases:
        def run(lm=models[name], options=options):
            lm.generate("time traveller", num_preds=num_chars, **options)
        if name.endswith("jax"):
            run()                                       # compiles, whatever --warmup says
        rows[label] = {"chars_per_s": counted * num_chars / timed(run, warmup, repeats), "rows": batch,
                       "model": name}
    after = peaks()
    rates = {shape: max(rate, after[shape]) for shape, rate in before.items()}     # the better: a higher bound
    for label, name, batch, counted, _ in cases:
        roof = generation_roofline(shapes[name], V, batch, peak_seconds, rates)
        bound = roof.pop("steps_per_s") * counted                  # the chars counted at each step
        rows[label].update(bound_chars_per_s=bound, roofline_fraction=rows[label]["chars_per_s"] / bound, **roof)
    base = next((r["chars_per_s"] for k, r in rows.items() if k.startswith("book")), None)
    for row in rows.values():
        row["ratio"] = row["chars_per_s"] / base if base else None
    return rows


def bench_data(megabytes=20, data_dir=None) -> dict:
    """Encoding throughput (MB/s) and peak traced memory per input character, rnnlab vs the book's lists."""
    raw = corpora.read_text(corpora.locate("timemachine", data_dir))
    big = raw * max(1, int(megabytes * 1e6 // len(raw)))
    rows = {}
    for label, sample, encode in (
            ("rnnlab load_corpus", big, lambda s: text.load_corpus(s, "d2l", "char")),
            ("book list path", raw * 2, _book_encode)):
        seconds = timed(lambda: encode(sample), 0, 1)       # timed untraced: tracing slows allocation
        tracemalloc.start()
        encode(sample)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows[label] = {"MB_per_s": len(sample) / seconds / 1e6, "peak_bytes_per_char": peak / len(sample),
                       "chars": len(sample)}
    return rows


def _book_encode(raw: str):
    from . import bench_book
    vocab = text.Vocab(text.preprocess(raw, "d2l", "char"))
    lines = [text.preprocess(line, "d2l", "char") for line in raw.split("\n")]
    return bench_book.encode_like_the_book("\n".join(lines), vocab)


def flops_per_token(cfg: BenchConfig, V: int) -> float:
    """Training FLOPs per token of a stack (multiply-adds x 2, forward + both backward matmuls): for the book's
    RNN, `bench_book.flops_per_token` (one-hot input gathered); for a GRU/LSTM of G gates, per layer the input
    projection (E or V inputs on the first layer, H on the others) and the recurrence, each (in, G H) three
    times over, and the output layer's three H x V matmuls."""
    from . import bench_book
    if cfg.cell == "rnn":
        return bench_book.flops_per_token(V, cfg.num_hiddens)
    H, G = cfg.num_hiddens, GATES[cfg.cell]
    first_in = cfg.embed_size or V
    inputs = sum(3 * 2 * (first_in if layer == 0 else H) * G * H for layer in range(cfg.num_layers))
    recurrent = cfg.num_layers * 3 * 2 * H * G * H
    return float(inputs + recurrent + 3 * 2 * H * V)


def roofline(cfg: BenchConfig, vocab_size: int) -> dict:
    """The float32 bound on training tokens/s. For the book's RNN: a measured matmul peak at the recurrence's
    shape, (B, H) @ (H, H), divided by the FLOPs of a training token. For a GRU/LSTM, two measured peaks: the
    recurrence's forward and backward matmuls must run step by step at (B, H) @ (H, G H), while the input
    projections, the weight gradients and the output layer can run as single matmuls over all T B rows,
    (T B, H) @ (H, G H), which run faster; the bound is one token's time at those two rates."""
    from . import bench_book
    H, G = cfg.num_hiddens, GATES[cfg.cell]
    peak = bench_book.matmul_peak(cfg.batch_size, H, columns=G * H)
    flops = flops_per_token(cfg, vocab_size)
    if cfg.cell == "rnn":
        return {"matmul_gflops": peak / 1e9, "flops_per_token": flops, "tokens_per_s_bound": peak / flops}
    stepwise = cfg.num_layers * 2 * 2 * H * G * H            # h W_h* forward and dgates W_h*^T backward
    wide = bench_book.matmul_peak(cfg.batch_size * cfg.num_steps, H, columns=G * H)
    seconds = stepwise / peak + (flops - stepwise) / wide
    return {"matmul_gflops": peak / 1e9, "wide_matmul_gflops": wide / 1e9, "flops_per_token": flops,
            "tokens_per_s_bound": 1 / seconds}


def run(configs=("book", "big", "word", "lstm"), device="cpu", repeats=3, warmup=1, num_batches=4,
        sections=("train", "generate", "data"), data_dir=None, quick=False, compile=True) -> dict:
    """All benchmarks; `quick` shrinks every size so the whole thing runs in seconds (for tests) and leaves
    out the torch.compile path, as `compile=False` does."""
    result = {"machine": machine(), "train": {}, "roofline": {}}
    for name in configs:
        cfg = CONFIGS[name]
        if quick:
            cfg = dataclasses.replace(cfg, batch_size=4, num_steps=5, num_hiddens=32,
                                      embed_size=min(cfg.embed_size, 8))
        if "train" in sections:
            result["train"][name] = bench_training(cfg, device, warmup, repeats, num_batches, data_dir,
                                                       compile and not quick)
            if result["machine"].get("torch"):
                result["roofline"][name] = roofline(cfg, result["train"][name]["config"]["V"])
    if "generate" in sections:
        result["generate"] = bench_generation(20 if quick else 200, warmup, repeats, data_dir,
                                              0.02 if quick else 0.2)
    if "data" in sections:
        result["data"] = bench_data(0.5 if quick else 20, data_dir)
    return result


def format_report(r: dict) -> str:
    """The result as readable tables."""
    m = r["machine"]
    lines = [f"machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} "
             f"({m.get('torch_threads')} threads, {m.get('cpu_capability')}, OMP_WAIT_POLICY "
             f"{m.get('omp_wait_policy') or 'unset'}), GPU: {m.get('gpu')}"]
    for name, t in r["train"].items():
        c = t["config"]
        model = "" if c.get("cell", "rnn") == "rnn" else f" {c['cell']} x{c['layers']} E={c['E']}"
        against = "vs book" if t.get("ratios_to", "book (baseline)").startswith("book") else "vs autograd"
        lines += ["", f"training, {name}:{model} B={c['B']} T={c['T']} V={c['V']} H={c['H']} ({c['token']}), "
                      f"{c['device']}, {c['dtype']}",
                  f"  {'path':<22} {'tokens/s':>12} {against:>11} {'first call':>11} {'of f32 roofline':>16}"]
        roof = r["roofline"].get(name)
        for path, row in t["paths"].items():
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            share = f"{row['tokens_per_s'] / roof['tokens_per_s_bound']:.0%}" if roof else "-"
            lines.append(f"  {path:<22} {row['tokens_per_s']:>12,.0f} {ratio:>11} {row['first_call_s']:>10.2f}s "
                         f"{share:>16}")
        if roof:
            wide = (f" and {roof['wide_matmul_gflops']:.0f} (TB x H @ H x GH)" if "wide_matmul_gflops" in roof
                    else "")
            lines.append(f"  roofline: {roof['matmul_gflops']:.0f} GFLOP/s measured (B x H @ H x GH, float32)"
                         f"{wide}, {roof['flops_per_token'] / 1e6:.2f} MFLOP per token: "
                         f"{roof['tokens_per_s_bound']:,.0f} tokens/s")
    if "generate" in r:
        lines += ["", "generation, numpy (and jax's compiled greedy loop): book config (V=28, H=512) and lstm "
                      "(2 layers, H=384, E=64),", "  chars/s over all rows; roofline: the step's float32 matmuls at "
                      "the peak measured at their shapes"]
        lines.append(f"  {'path':<36} {'chars/s':>12} {'vs book':>8} {'roofline':>12} {'of it':>6}")
        peaks = {}
        for path, row in r["generate"].items():
            ratio = f"{row['ratio']:.1f}x" if row.get("ratio") else "-"
            roof = (f"{row['bound_chars_per_s']:>12,.0f} {row['roofline_fraction']:>6.0%}"
                    if "bound_chars_per_s" in row else f"{'-':>12} {'-':>6}")
            lines.append(f"  {path:<36} {row['chars_per_s']:>12,.0f} {ratio:>8} {roof}")
            peaks.update(row.get("matmul_gflops", {}))
        if peaks:
            lines.append("  matmul peaks (GFLOP/s): " + ", ".join(f"{shape} {g:.0f}" for shape, g in peaks.items()))
    if "data" in r:
        lines += ["", "data encoding (d2l preprocessing + vocabulary + encoding)"]
        for path, row in r["data"].items():
            lines.append(f"  {path:<22} {row['MB_per_s']:>8.1f} MB/s  {row['peak_bytes_per_char']:>6.1f} "
                         f"peak bytes/char  ({row['chars']:,} chars)")
    return "\n".join(lines)
