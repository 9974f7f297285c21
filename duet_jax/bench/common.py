"""What every ``duet-jax bench`` shares: timing, peak memory, the matmul peak, FLOP counting, the
examples, the peer model builders and the one shape of a case's comparison.

No bench module imports another; each imports this one (``tests/bench/test_common.py`` checks).
torch / peft / transformers are imported inside functions only.

A case (:func:`compare`) reports ours, every peer, ``strongest_peer`` (the fastest peer that
actually ran), ``ratio_vs_strongest`` (ours / that peer) and each side's fraction of the matmul
peak measured in the same run (``gflops / seconds / peak``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

__all__ = ["ATTN", "MatmulPeak", "alternate", "bench_examples", "compare", "load_average",
           "emit", "machine_info", "matmul_peak_gflops", "median_time", "nonzero_b", "now", "peak_rss_mib",
           "peer_model", "peer_tensors", "peer_versions", "require_peer", "rss_mib", "run_child",
           "side", "torch_matmul_peak_gflops", "train_flops", "with_lora"]

#: the LoRA targets of the benches (q, k, v, o of each adapted layer)
ATTN = ("q", "k", "v", "o")


# ------------------------------------------------------------------------------------ timing
def now() -> float:
    return time.perf_counter()


def median_time(fn: Callable[[], object], repeats: int = 3, *, warmup: bool = True) -> tuple[float, list[float]]:
    """``(median seconds, every rep)`` of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    if warmup:
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = now()
        fn()
        ts.append(now() - t0)
    return float(np.median(ts)), ts


def alternate(fns: dict[str, Callable[[], object] | None], repeats: int) -> dict[str, tuple[float, list[float]]]:
    """Median seconds of each ``fns`` entry (``None`` entries skipped), reps interleaved
    (a, b, c, a, b, c, ...) so that load from other processes hits every side alike. No warm-up:
    warm each side up before."""
    ts: dict[str, list[float]] = {k: [] for k, f in fns.items() if f is not None}
    for _ in range(max(1, repeats)):
        for k in ts:
            t0 = now()
            fns[k]()
            ts[k].append(now() - t0)
    return {k: (float(np.median(v)), v) for k, v in ts.items()}


# ------------------------------------------------------------------------------------ memory
def _proc_status_mib(field: str) -> float | None:
    """``field`` (e.g. ``VmHWM``) of /proc/self/status in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; ``ru_maxrss`` where there is none).
    The one definition of peak memory of every bench."""
    hwm = _proc_status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if hwm is None else hwm


def rss_mib() -> float | None:
    """This process's resident memory now (``VmRSS``) in MiB, or None."""
    return _proc_status_mib("VmRSS")


# ------------------------------------------------------------------------------------ the machine
def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import jax

    return {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform()}


def matmul_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    """float32 GFLOP/s of a jitted ``n x n @ n x n`` matmul on JAX's default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t, _ = median_time(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 / t / 1e9


def torch_matmul_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    """float32 GFLOP/s of ``torch.mm`` at ``n x n`` (the peer's own view of the same peak)."""
    import torch

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    t, _ = median_time(lambda: torch.mm(a, a), repeats)
    return 2 * n**3 / t / 1e9


class MatmulPeak:
    """The matmul peak of this run: samples taken at the start, the end and wherever a bench adds
    one (e.g. torch's in a peer's process); the largest counts."""

    def __init__(self, n: int = 2048):
        self.n = n
        self.samples: list[float] = []
        self.sources: list[str] = []

    def sample(self) -> float:
        v = float(matmul_peak_gflops(self.n))
        self.add(v, "jax")
        return v

    def add(self, gflops: float | None, source: str) -> None:
        if gflops:
            self.samples.append(float(gflops))
            self.sources.append(source)

    @property
    def peak(self) -> float:
        if not self.samples:
            self.sample()
        return max(self.samples)

    def info(self) -> dict:
        return {"matmul_peak_gflops": self.peak, "matmul_peak_samples_gflops": list(self.samples),
                "matmul_peak_sample_sources": list(self.sources), "matmul_n": self.n}


# ------------------------------------------------------------------------------------ FLOPs
def _layer_linear_params(cfg) -> int:
    d, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return d * (q + 2 * kv) + q * d + 3 * d * i


def train_flops(cfg, *, rows: int, seq: int, head_positions: int, start: int = 0,
                first_trained: int | None = 0, lora_layers: int = 0, lora_rank: int = 8,
                targets: tuple[str, ...] = ATTN) -> float:
    """Matmul FLOPs of one pass over ``rows`` sequences of ``seq`` tokens: forward through layers
    ``[start, L)`` plus the LM head on ``head_positions`` positions; with ``first_trained`` set,
    the backward (input gradients of the frozen matmuls, 2x for attention, LoRA A/B gradients)
    from the head down to layer ``first_trained``. ``first_trained=None``: forward only."""
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    qd = cfg.num_heads * cfg.head_dim
    lin = 2 * _layer_linear_params(cfg)  # per token, forward
    att = 4 * seq * qd  # scores + weighted sum, per token (full T x T as computed)
    tok = rows * seq
    dims = {"q": (D, qd), "k": (D, cfg.num_kv_heads * cfg.head_dim),
            "v": (D, cfg.num_kv_heads * cfg.head_dim), "o": (qd, D)}
    lora_tok = sum(2 * lora_rank * (dims[t][0] + dims[t][1]) for t in targets)
    fwd = tok * (L - start) * (lin + att) + tok * lora_layers * lora_tok + 2 * head_positions * D * V
    if first_trained is None:
        return float(fwd)
    n_bwd = L - max(first_trained, start)
    bwd = tok * n_bwd * (lin + 2 * att) + 2 * tok * lora_layers * lora_tok + 2 * head_positions * D * V
    return float(fwd + bwd)


# ------------------------------------------------------------------------------------ comparison
def side(examples_per_s: float | None, *, seconds: float | None = None, gflops: float | None = None,
         what: str = "", **extra) -> dict:
    """One side of a case: its rate, the seconds and GFLOP it took (for its fraction of the
    matmul peak), what it is, and details."""
    return {"examples_per_s": examples_per_s, "seconds": seconds, "gflops": gflops, "what": what, **extra}


def compare(name: str, ours: dict, peers: dict[str, dict], peak: float, **extra) -> dict:
    """A case: ``ours`` and ``peers`` (each from :func:`side`), the fastest peer that ran
    (``strongest_peer``; a peer whose ``feasible`` is False, e.g. a matrix that would not fit in
    memory timed on a slice, never counts), ``ratio_vs_strongest`` = ours / it, ``ratios`` against
    each peer, and every side's ``fraction_of_matmul_peak`` (None where its FLOPs are not counted).
    """

    def frac(s):
        g, t = s.get("gflops"), s.get("seconds")
        return g / t / peak if g and t and peak else None

    ours = {**ours, "fraction_of_matmul_peak": frac(ours)}
    peers = {k: {**v, "fraction_of_matmul_peak": frac(v)} for k, v in peers.items()}
    rate = ours.get("examples_per_s")
    ran = {k: v["examples_per_s"] for k, v in peers.items()
           if v.get("examples_per_s") and v.get("feasible", True)}
    best = max(ran, key=ran.get) if ran else None
    ratios = {k: (rate / v["examples_per_s"] if rate and v.get("examples_per_s") else None)
              for k, v in peers.items()}
    return {"name": name, "ours": ours, "peers": peers, "strongest_peer": best,
            "strongest_peer_examples_per_s": ran.get(best) if best else None,
            "ratio_vs_strongest": ratios.get(best) if best else None, "ratios": ratios,
            "ours_examples_per_s": rate, "ours_fraction_of_matmul_peak": ours["fraction_of_matmul_peak"],
            "matmul_peak_gflops": peak, **extra}


# ------------------------------------------------------------------------------------ inputs
def bench_examples(domain: str, n: int):
    """The first ``n`` train examples of a built-in domain (repeated when it has fewer)."""
    from duet_jax.data import SplitSpec, get_domain

    train = get_domain(domain).splits(SplitSpec(validation=0.1, evaluation=0.2)).train
    if len(train) < n:
        reps = -(-n // len(train))
        train = (list(train) * reps)
    return list(train[:n])


def with_lora(model, targets=ATTN, last_layers=None, seed=1):
    """A copy of ``model``'s graph with adapters attached: ``(graphdef, lora, frozen, start)``."""
    from flax import nnx

    from duet_jax.models import LoRAConfig, add_lora
    from duet_jax.train import split_model, trunk_start

    g, st = nnx.split(model)
    m = nnx.merge(g, st)  # a fresh module tree sharing the (immutable) weight arrays
    add_lora(m, LoRAConfig(rank=8, alpha=16, targets=targets, last_layers=last_layers),
             rngs=nnx.Rngs(seed))
    g2, lora, frozen = split_model(m)
    return g2, lora, frozen, trunk_start(m)


def nonzero_b(lora, scale: float = 0.02, seed: int = 0):
    """LoRA state with ``lora_b ~ N(0, scale^2)`` (a fresh adapter has B = 0, so every A-gradient
    would be 0; a proxy adapter after fine-tuning has both non-zero)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def f(path, x):
        if "lora_b" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.normal(0.0, scale, np.shape(x)).astype(np.float32))
        return x

    return jax.tree_util.tree_map_with_path(f, lora)


# ------------------------------------------------------------------------------------ the peers
def require_peer() -> None:
    """Raise ``SystemExit`` with the fix when torch / peft / transformers are missing."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the peer needs torch + peft + transformers ({e}); install the bench "
                         "extra (make bench-setup) or pass --no-peer") from e


def peer_versions() -> dict:
    import peft
    import torch
    import transformers

    return {"peer": f"transformers {transformers.__version__} / peft {peft.__version__} / torch {torch.__version__}",
            "torch_threads": torch.get_num_threads()}


def peer_model(cfg, weights, last_layers=None, *, attn: str | None = None, rank: int = 8, alpha: int = 16):
    """transformers' ``*ForCausalLM`` built from our config and weights, with PEFT LoRA (r=8, alpha
    16, no dropout) on q,k,v,o of every layer (or the last ``last_layers``); ``attn`` sets the
    attention implementation (``eager``, ``sdpa``; None: transformers' default)."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    kw = {} if attn is None else {"attn_implementation": attn}
    tm = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, **kw)
    sd = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise RuntimeError(f"peer weights did not load: missing {missing}, unexpected {unexpected}")
    tm.tie_weights()
    layers = None if last_layers is None else list(range(cfg.num_layers - last_layers, cfg.num_layers))
    lc = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                         target_modules=[f"{t}_proj" for t in ATTN], layers_to_transform=layers,
                         task_type="CAUSAL_LM")
    return peft.get_peft_model(tm, lc)


def peer_tensors(tok_split, seq_len: int):
    """``(input_ids, attention_mask, labels)`` torch tensors ``[N, seq_len]``; labels are -100 off
    the loss (answer) tokens."""
    import torch

    ids = torch.from_numpy(tok_split.input_ids[:, :seq_len].astype(np.int64))
    att = torch.from_numpy(tok_split.attention_mask[:, :seq_len].astype(np.int64))
    lm = torch.from_numpy(tok_split.loss_mask[:, :seq_len].astype(bool))
    labels = torch.where(lm, ids, torch.full_like(ids, -100))
    return ids, att, labels


# ------------------------------------------------------------------------------------ children
def run_child(module: str, func: str, args: tuple, tag: str) -> dict:
    """Run ``module.func(*args)`` in a fresh interpreter (its own peak memory) and return the JSON
    object it printed on a line starting with ``tag + " "``; ``{"error": ...}`` if it failed."""
    code = f"from {module} import {func}; {func}(*{args!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith(tag + " ")]
    if p.returncode != 0 or not line:
        return {"error": (p.stderr or p.stdout)[-3000:]}
    return json.loads(line[-1][len(tag) + 1:])


def emit(tag: str, obj: dict) -> None:
    """What a child prints for :func:`run_child`."""
    print(tag + " " + json.dumps(obj), flush=True)
