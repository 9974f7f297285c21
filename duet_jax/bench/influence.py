"""``duet-jax bench influence``: featurize throughput and projection speed against PyTorch peers.

Measured in one run on this machine:

1. the matmul peak (a large float32 ``jnp`` matmul at the start and the end, and ``torch.mm`` in
   the peer's process; the largest counts), to report every side's fraction of it;
2. the ``featurize`` case (examples/s: per-example gradients + projection to k = 8192) of
   SmolLM2-135M-Instruct with LoRA r=8 on q,k,v,o of all 30 layers (921,600 LoRA parameters),
   ``max_length`` 128, real QA examples (``arc_easy`` train split), loss = mean NLL over the answer
   tokens of one example, on the same weights, adapter and examples:

   - ours: the run's own featurize step, the functions
     :func:`~duet_jax.influence.domains.domain_influence` calls: ``domain_scorer`` (the scorer
     built from an :class:`~duet_jax.influence.domains.InfluenceConfig`), ``domain_store`` (a
     resumable :class:`~duet_jax.influence.store.FeatureStore` of ``chunk_size`` rows) and
     ``featurize_rows`` (rows sorted by length, each chunk trimmed to the run's encode buckets);
     ``--projector`` is the config's ``projector`` (``pallas`` is interpreted on CPU);
   - peers, every combination of a gradient method and a projection:

     gradients: ``vmap`` (torch.func ``vmap(grad)`` over ``functional_call``, 8 at a time, rows
     padded to ``max_length``, eager attention) and ``loop`` (LESS's own loop: batch 1, each
     example at its real length, SDPA attention with ``is_causal`` and no mask,
     ``torch.autograd.grad``);
     projections, every ``project_every`` (16) examples as LESS does: ``trak`` (TRAK's CPU
     Rademacher ``BasicProjector``, regenerated on every call), ``rademacher_kept`` (a Rademacher
     matrix generated once and kept; above ``dense_cap_gib`` it cannot be kept, so it is timed on a
     row slice, scaled, and marked ``feasible: false``) and ``sjlt`` (a sparse JL in torch:
     bucket and sign per coordinate drawn once, ``index_add_``);
   - a check that every side computes the same thing: cosine of the unprojected gradients of two
     examples and every example's loss, ours against each gradient method;
   - each side in a fresh interpreter (its own peak memory, :func:`~duet_jax.bench.common.peak_rss_mib`).
3. the ``projection`` case, ``[16, P] -> [16, k]``: ours (the config's projector; our SJLT, chunked
   Rademacher and a dense matmul scaled from a slice are reported too) against the three torch
   projections;
4. at P = 12M: SJLT runs (a ``P x k`` matrix would need 366 GiB) and XLA's temporaries of the
   compiled SJLT and chunked projections are reported.

Each case (``cases`` in the JSON) has ``ours``, ``peers`` (every side with ``examples_per_s`` and
``fraction_of_matmul_peak``), ``strongest_peer`` and ``ratio_vs_strongest`` (ours / the fastest
peer that ran). ``--model mlp`` / ``--quick``: the small LoRA MLP case, written identically in
JAX and PyTorch (:func:`featurize_throughput` takes any ``loss_fn(params, example)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax.bench.common import (
    MatmulPeak,
    bench_examples,
    compare,
    emit,
    load_average,
    machine_info,
    median_time,
    nonzero_b,
    now,
    peak_rss_mib,
    peer_model,
    peer_tensors,
    peer_versions,
    require_peer,
    run_child,
    side,
    torch_matmul_peak_gflops,
    train_flops,
    with_lora,
)

HELP = "influence featurize throughput and projection speed vs torch peers (LESS loop, TRAK, SJLT)"

__all__ = ["HELP", "GRADS", "PROJECTIONS", "add_arguments", "main", "featurize_throughput", "run",
           "run_llama", "torch_rademacher_kept", "torch_sjlt",
           "torch_trak_projector"]

#: the peers' gradient methods and projections (every combination is a peer)
GRADS = ("vmap", "loop")
PROJECTIONS = ("trak", "rademacher_kept", "sjlt")


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC",
                        help="the LoRA model (default SmolLM2-135M-Instruct), or 'mlp' for the "
                             "small LoRA MLP")
    parser.add_argument("--quick", action="store_true", help="the LoRA MLP at small sizes (seconds)")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 8192; quick 1024)")
    parser.add_argument("--projector", default="sjlt",
                        help="ours: InfluenceConfig.projector (what --influence.projector sets in a run)")
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peers")
    parser.add_argument("--domain", default="arc_easy", help="built-in QA domain (train split)")
    parser.add_argument("--examples", type=int, default=16, help="examples featurized per side")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="max_length; the vmap peer pads to it, the loop peer runs real lengths")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="ours: InfluenceConfig.chunk_size (default min(64, examples)); the "
                             "scorer vmaps min(chunk_size, 16) rows at a time, as in a run")
    parser.add_argument("--buckets", default=None,
                        help="ours: comma-separated encode bucket lengths the chunks are trimmed to "
                             "(default: the run's, EncodeConfig(max_length=seq_len).bucket_lengths)")
    parser.add_argument("--last-layers", type=int, default=None,
                        help="LoRA on the last N layers only, as a run's --lora.last_layers (ours then "
                             "featurizes from the frozen-trunk hidden states; default: every layer)")
    parser.add_argument("--batch-size", type=int, default=8, help="the vmap peer's examples per call")
    parser.add_argument("--peer-grads", default=",".join(GRADS), help="subset of " + ", ".join(GRADS))
    parser.add_argument("--peer-projections", default=",".join(PROJECTIONS),
                        help="subset of " + ", ".join(PROJECTIONS))
    parser.add_argument("--dense-cap-gib", type=float, default=4.0,
                        help="largest Rademacher matrix the rademacher_kept peer may keep")
    parser.add_argument("--repeats", type=int, default=2, help="our timed reps (each peer runs once)")
    parser.add_argument("--large-p", type=int, default=12_000_000,
                        help="P of the bounded-memory projection check (0: skip)")


def _csv(s: str, allowed) -> tuple[str, ...]:
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    return out


# ------------------------------------------------------------------ torch projections
def torch_trak_projector(p: int, k: int, seed: int = 0, block: int = 128):
    """TRAK's CPU ``BasicProjector`` (Rademacher), as LESS configures it (``block_size=128``).

    The ``P x k`` matrix is never kept: each call regenerates it ``block`` output columns at a time
    (``bernoulli_`` from a seeded generator, mapped to +-1, ``P x block`` floats in memory) and
    multiplies. Scaled by ``1 / sqrt(k)`` like ours (TRAK leaves it unscaled; the cost is nil).
    Returns ``project(g: [B, P] torch float32) -> [B, k]``.
    """
    import torch

    def project(g):
        out = torch.empty(g.shape[0], k)
        m = torch.empty(p, min(block, k))
        gen = torch.Generator()
        for i, s in enumerate(range(0, k, block)):
            e = min(s + block, k)
            gen.manual_seed(seed * 100_003 + i)
            m.bernoulli_(0.5, generator=gen)
            m.mul_(2.0).sub_(1.0)
            out[:, s:e] = g @ m[:, : e - s]
        return out / k**0.5

    return project


def torch_rademacher_kept(p: int, k: int, seed: int = 0, cap_gib: float = 4.0):
    """A Rademacher ``P x k`` matrix generated once and kept, ``project(g) = g @ R / sqrt(k)``.

    Returns ``(project, info)``. Where ``P x k`` float32 exceeds ``cap_gib``, only ``rows`` rows
    (the cap) are kept and ``project`` multiplies the first ``rows`` columns of ``g``: its time
    scaled by ``P / rows`` is what the whole matrix would take (``info["feasible"]`` False).
    """
    import torch

    rows = int(min(p, max(1, cap_gib * 2**30 // (4 * k))))
    gen = torch.Generator().manual_seed(seed)
    t0 = now()
    m = torch.empty(rows, k).bernoulli_(0.5, generator=gen).mul_(2.0).sub_(1.0).div_(k**0.5)
    info = {"rows_kept": rows, "scale": p / rows, "feasible": rows == p, "generate_s": now() - t0,
            "matrix_gib": p * k * 4 / 2**30}
    return (lambda g: g[:, :rows] @ m), info


def torch_sjlt(p: int, k: int, seed: int = 0):
    """A sparse JL transform in torch: each coordinate ``i`` gets a bucket ``h(i)`` and a sign
    ``s(i)`` drawn once (``torch.randint``; ``P`` ints + ``P`` floats kept), and
    ``y[:, h(i)] += s(i) x[:, i]`` (``index_add_``). Returns ``project(g: [B, P]) -> [B, k]``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, k, (p,), generator=gen)
    sign = torch.randint(0, 2, (p,), generator=gen).float().mul_(2.0).sub_(1.0)

    def project(g):
        return torch.zeros(g.shape[0], k, dtype=g.dtype).index_add_(1, bucket, g * sign)

    return project


def _proj_gflops(name: str, rows: int, p: int, k: int) -> float:
    """FLOPs of a projection of ``rows`` rows, in GFLOP (dense kinds: a ``P x k`` matmul; SJLT and
    identity: one multiply-add per coordinate or none)."""
    if name in ("sjlt",):
        return 2 * rows * p / 1e9
    if name == "identity":
        return 0.0
    return 2 * rows * p * k / 1e9


# ------------------------------------------------------------------ the LoRA MLP case (--quick)
def lora_mlp(d: int = 256, rank: int = 8, layers: int = 4, seq: int = 32, seed: int = 0):
    """A LoRA MLP over a token sequence: frozen ``W_l``, trainable ``A_l [d, r]``, ``B_l [r, d]``.

    ``h_{l+1} = tanh(h_l W_l + (h_l A_l) B_l)``, loss ``mean_t (h_L[t] . v - y[t])^2``.

    Returns:
      ``(loss_fn, lora_params, frozen, make_batch)``; ``loss_fn(lora, example)``.
    """
    rng = np.random.default_rng(seed)
    frozen = {
        "w": (rng.normal(size=(layers, d, d)) / np.sqrt(d)).astype(np.float32),
        "v": (rng.normal(size=(d,)) / np.sqrt(d)).astype(np.float32),
    }
    lora = {
        "a": (rng.normal(size=(layers, d, rank)) / np.sqrt(d)).astype(np.float32),
        "b": (0.01 * rng.normal(size=(layers, rank, d))).astype(np.float32),
    }
    fw, fv = jnp.asarray(frozen["w"]), jnp.asarray(frozen["v"])

    def loss_fn(p, ex):
        def layer(h, wab):
            w, a, b = wab
            return jnp.tanh(h @ w + (h @ a) @ b), None

        h, _ = jax.lax.scan(layer, ex["x"], (fw, p["a"], p["b"]))
        return jnp.mean((h @ fv - ex["y"]) ** 2)

    def make_batch(n: int, seed: int = 1):
        r = np.random.default_rng(seed)
        return {"x": r.normal(size=(n, seq, d)).astype(np.float32),
                "y": r.normal(size=(n, seq)).astype(np.float32)}

    return loss_fn, jax.tree_util.tree_map(jnp.asarray, lora), frozen, make_batch


def _torch_lora_mlp_grads(frozen, lora, batch):
    """torch per-example gradients of the same model: ``{"vmap": fn, "loop": fn}``, each
    ``fn() -> [B, P]`` (``torch.func.vmap(grad)`` 16 at a time; a batch-1 ``autograd.grad`` loop)."""
    import torch
    from torch.func import grad, vmap

    w = torch.from_numpy(frozen["w"])
    v = torch.from_numpy(frozen["v"])
    p = {k: torch.from_numpy(np.array(x)) for k, x in lora.items()}
    x = torch.from_numpy(batch["x"])
    y = torch.from_numpy(batch["y"])

    def loss(p, xi, yi):
        h = xi
        for layer in range(w.shape[0]):
            h = torch.tanh(h @ w[layer] + (h @ p["a"][layer]) @ p["b"][layer])
        return ((h @ v - yi) ** 2).mean()

    per_ex = vmap(grad(loss), in_dims=(None, 0, 0))

    def run_vmap(bs: int = 16):
        outs = []
        for s in range(0, x.shape[0], bs):
            g = per_ex(p, x[s : s + bs], y[s : s + bs])
            outs.append(torch.cat([g["a"].flatten(1), g["b"].flatten(1)], 1))
        return torch.cat(outs)

    leaves = {k: t.clone().requires_grad_(True) for k, t in p.items()}

    def run_loop():
        outs = []
        for i in range(x.shape[0]):
            ga, gb = torch.autograd.grad(loss(leaves, x[i], y[i]), [leaves["a"], leaves["b"]])
            outs.append(torch.cat([ga.flatten(), gb.flatten()]))
        return torch.stack(outs)

    return {"vmap": run_vmap, "loop": run_loop}


def featurize_throughput(loss_fn, params, batch, *, proj_dim: int, projector: str = "sjlt",
                         batch_size: int = 16) -> dict:
    """Examples/s of ``InfluenceScorer.featurize`` (compiled once, then timed).

    Args:
      loss_fn, params, batch: any pure loss, its parameters and a batch [B, ...].
      proj_dim, projector, batch_size: scorer options.

    Returns:
      dict with ``examples_per_s``, ``seconds``, ``flops`` (XLA's estimate, or None),
      ``num_params``.
    """
    from duet_jax.influence import InfluenceScorer

    scorer = InfluenceScorer(loss_fn, proj_dim=proj_dim, projector=projector,
                             batch_size=batch_size)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    t, _ = median_time(lambda: scorer.featurize(params, batch).block_until_ready())
    flops = None
    try:
        p = scorer._dim(params)
        proj, state, fn = scorer._get(p)
        ca = fn.lower(params, batch, None, state, None).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops")) if ca and ca.get("flops") else None
    except Exception:  # cost analysis is best effort
        flops = None
    return {"examples_per_s": b / t, "seconds": t, "flops": flops,
            "num_params": scorer._dim(params)}


def run(quick: bool = False, proj_dim: int | None = None, projector: str = "sjlt",
        peer: bool = True) -> dict:
    """The LoRA MLP case (``--model mlp`` / ``--quick``)."""
    k = proj_dim or (1024 if quick else 8192)
    peak = MatmulPeak(1024 if quick else 2048)
    peak.sample()
    out = {**machine_info(), "proj_dim": k, "projector": projector, "model": "lora_mlp (pluggable)"}
    out["projection"] = _projection_bench(100_000 if quick else 920_000, k, 16, peer)

    d, n = (128, 32) if quick else (256, 64)
    loss_fn, lora, frozen, make_batch = lora_mlp(d=d, rank=8, layers=4, seq=32)
    batch = make_batch(n)
    ours = featurize_throughput(loss_fn, lora, batch, proj_dim=k, projector=projector)
    P = ours["num_params"]
    out["num_params"] = P
    out["ours_examples_per_s"] = ours["examples_per_s"]
    # matmul FLOPs of one example's gradient: forward + 2x backward of 4 layers of
    # h W + (h A) B over 32 tokens; every side computes the same, plus its projection
    grad_gf = n * 3 * 4 * 32 * (2 * d * d + 4 * d * 8) / 1e9
    ours_side = side(ours["examples_per_s"], seconds=ours["seconds"],
                     gflops=grad_gf + _proj_gflops(projector, n, P, k), xla_gflops=(ours["flops"] or 0) / 1e9,
                     what=f"InfluenceScorer.featurize ({projector})")
    peers = {}
    if peer:

        peak.add(torch_matmul_peak_gflops(1024 if quick else 2048), "torch")
        fns = _torch_lora_mlp_grads(frozen, lora, batch)
        grads, grad_s = {}, {}
        for name, fn in fns.items():
            fn()  # warm-up
            t0 = now()
            grads[name] = fn()
            grad_s[name] = now() - t0
        projs = {"trak": torch_trak_projector(P, k), "sjlt": torch_sjlt(P, k)}
        kept, kinfo = torch_rademacher_kept(P, k)
        projs["rademacher_kept"] = kept
        proj_s = {}
        for name, pr in projs.items():
            pr(grads["loop"][:16])  # warm-up
            t0 = now()
            for s in range(0, n, 16):
                pr(grads["loop"][s:s + 16])
            proj_s[name] = (now() - t0) * (kinfo["scale"] if name == "rademacher_kept" else 1.0)
        for gname in fns:
            for pname in projs:
                sec = grad_s[gname] + proj_s[pname]
                peers[f"{gname}+{pname}"] = side(
                    n / sec, seconds=sec, gflops=grad_gf + _proj_gflops("sjlt" if pname == "sjlt" else "dense", n, P, k),
                    feasible=pname != "rademacher_kept" or kinfo["feasible"],
                    what=f"torch {gname} gradients + {pname} projection")
        out["peer_examples_per_s"] = peers["vmap+trak"]["examples_per_s"]
        out["peer_grad_only_examples_per_s"] = n / grad_s["vmap"]
        out["peer_loop_grad_only_examples_per_s"] = n / grad_s["loop"]
        out["ratio"] = out["ours_examples_per_s"] / out["peer_examples_per_s"]
    else:
        out["peer_examples_per_s"] = out["ratio"] = None
    peak.sample()
    case = compare("featurize", ours_side, peers, peak.peak)
    out["cases"] = [case]
    out.update(strongest_peer=case["strongest_peer"], ratio_vs_strongest=case["ratio_vs_strongest"],
               **peak.info())
    if case["ours"]["fraction_of_matmul_peak"] is not None:
        out["ours_fraction_of_matmul_peak"] = case["ours"]["fraction_of_matmul_peak"]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# ------------------------------------------------------------------ the SmolLM2-135M LoRA case
class _LlamaCase:
    """Every side's inputs: the model with LoRA r=8 (alpha 16) on q,k,v,o of every layer (or of
    the last ``last_layers``, as a run's ``--lora.last_layers``: then ours featurizes from the
    frozen-trunk hidden states, ``start`` > 0), B non-zero, the examples tokenized once
    (``max_length = seq_len``) and the run's encode buckets."""

    def __init__(self, model, tokenizer, examples, seq_len: int, b_scale: float = 0.02, seed: int = 0,
                 buckets=None, last_layers: int | None = None):
        from duet_jax.data import EncodeConfig, encode_examples

        self.model, self.cfg, self.seq_len = model, model.config, seq_len
        self.tok = encode_examples(examples, tokenizer, EncodeConfig(max_length=seq_len, buckets=(seq_len,)))
        self.buckets = tuple(buckets) if buckets else EncodeConfig(max_length=seq_len).bucket_lengths
        g, lora, frozen, start = with_lora(model, last_layers=last_layers)
        self.g, self.lora, self.frozen = g, nonzero_b(lora, b_scale, seed), frozen
        self.last_layers = last_layers
        self.lora_layers = self.cfg.num_layers if last_layers is None else int(last_layers)
        self.start = int(start)
        self.num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.lora)))

    def peft_lora(self) -> dict:
        from flax import nnx

        from duet_jax.models.lora import peft_state_dict

        return peft_state_dict(nnx.merge(self.g, self.lora, self.frozen))


def _llama_case_from_spec(spec: str, domain: str, n: int, seq_len: int, buckets=None,
                          last_layers=None) -> _LlamaCase:
    from duet_jax.data import load_tokenizer
    from duet_jax.models import load_model

    return _LlamaCase(load_model(spec, dtype="float32"), load_tokenizer(spec), bench_examples(domain, n), seq_len,
                      buckets=buckets, last_layers=last_layers)


def _influence_config(proj_dim: int, projector: str, chunk_size: int):
    from duet_jax.influence.domains import InfluenceConfig

    return InfluenceConfig(proj_dim=proj_dim, projector=projector, chunk_size=chunk_size)


def _ours_llama(case: _LlamaCase, *, proj_dim: int, projector: str, chunk_size: int, repeats: int,
                check: int) -> tuple[dict, dict]:
    """The run's featurize on the case: ``(info, arrays)``; arrays: ``losses [n]`` (pool order),
    ``check_rows`` and the unprojected gradients of ``check`` rows under their PEFT names."""
    from flax import nnx

    from duet_jax.influence.domains import domain_scorer, domain_store, featurize_rows, trim_pool
    from duet_jax.models.lora import peft_state_dict
    from duet_jax.train import build_pool

    cfg = case.cfg
    icfg = _influence_config(proj_dim, projector, chunk_size)
    pool, _ = build_pool(case.tok, length=case.seq_len)
    n = len(pool)
    trunk_s = trunk_compile_s = None
    if case.start > 0:  # as Setting.with_trunk: the frozen layers' output once per pool row
        from duet_jax.train import trunk_hidden

        t0 = now()
        jax.block_until_ready(trunk_hidden(case.g, case.lora, case.frozen, pool, start=case.start))
        trunk_compile_s = now() - t0
        t0 = now()
        pool = pool.with_hidden(trunk_hidden(case.g, case.lora, case.frozen, pool, start=case.start))
        jax.block_until_ready(pool.hidden)
        trunk_s = now() - t0
    # as domain_influence: the domain's rows shortest first, then featurized chunk by chunk
    order = np.argsort(np.asarray(pool.attention_mask).sum(1), kind="stable")
    examples = jax.tree.map(lambda a: np.asarray(a)[order], pool)
    scorer = domain_scorer(case.g, case.start, icfg)
    ids = [str(i) for i in order]
    lengths = []
    with tempfile.TemporaryDirectory(prefix="duet-bench-if-store-") as tmp:
        def once(i):  # a fresh store each time: every chunk is computed (and written, as in a run)
            lengths.clear()
            store = domain_store(scorer, case.lora, os.path.join(tmp, f"rep{i}"), domain="bench", example_ids=ids,
                                 start=case.start, chunk_size=icfg.chunk_size)
            return featurize_rows(scorer, case.lora, examples, case.frozen, store=store, buckets=case.buckets,
                                  on_trim=lambda t: lengths.append(t.length))

        t0 = now()
        feats, valid = once(0)
        compile_s = now() - t0
        reps = []
        for i in range(repeats):
            t0 = now()
            once(i + 1)
            reps.append(now() - t0)
    sec = float(np.median(reps))
    A = pool.answer_slots
    P = case.num_params
    gflops = sum(train_flops(cfg, rows=icfg.chunk_size, seq=T, head_positions=icfg.chunk_size * A,
                             start=case.start, first_trained=case.start, lora_layers=case.lora_layers) / 1e9
                 + _proj_gflops(projector, icfg.chunk_size, P, proj_dim) for T in lengths)
    # not timed: per-example losses (full length) and the unprojected gradients of the first
    # `check` rows in the run's order (the shortest), differentiated as featurize does
    loss = scorer.loss_fn
    host = jax.tree.map(np.asarray, pool)
    losses = np.asarray(jax.jit(lambda lo, b, fr: jax.lax.map(lambda ex: loss(lo, ex, fr), b, batch_size=8))(
        case.lora, host, case.frozen))
    c = min(check, n)
    rows_c = order[:c]
    sub_c = trim_pool(jax.tree.map(lambda a: a[rows_c], host), case.buckets)
    vg = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, None)))(case.lora, sub_c, case.frozen)
    grads = {}
    for i in range(c):
        gi = jax.tree.map(lambda x, i=i: x[i], vg)
        for name, v in peft_state_dict(nnx.merge(case.g, gi, case.frozen)).items():
            grads[f"{i}/{name}"] = v
    info = {"examples_per_s": n / sec, "seconds": sec, "num_params": P, "reps_s": reps,
            "compile_s": compile_s, "chunk_size": icfg.chunk_size, "vmapped_rows": scorer.options.batch_size,
            "buckets": list(case.buckets), "chunk_lengths": list(lengths), "answer_slots": A, "gflops": gflops,
            "valid": int(np.sum(valid)), "feature_shape": list(feats.shape),
            "mean_padded_length": float(np.mean(lengths)),
            "mean_real_length": float(np.mean(np.asarray(pool.attention_mask).sum(1))),
            "influence_config": dataclasses.asdict(icfg), "start": case.start, "lora_layers": case.lora_layers,
            "trunk_s": trunk_s, "trunk_compile_s": trunk_compile_s,
            "path": "duet_jax.influence.domains: domain_scorer + domain_store + featurize_rows (domain_influence's own calls)"}
    return info, {"losses": losses, "check_rows": rows_c, **grads}


@contextlib.contextmanager
def _count_sdpa():
    """Count ``torch.nn.functional.scaled_dot_product_attention`` calls: ``{"causal_no_mask": n,
    "masked": n, "other": n}`` (what the loop peer's attention really ran)."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    counts = {"causal_no_mask": 0, "masked": 0, "other": 0}

    def wrapped(*a, **kw):
        if kw.get("attn_mask") is not None:
            counts["masked"] += 1
        elif kw.get("is_causal"):
            counts["causal_no_mask"] += 1
        else:
            counts["other"] += 1
        return orig(*a, **kw)

    F.scaled_dot_product_attention = wrapped
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = orig


def _load_peer_lora(pm, case: _LlamaCase):
    import torch

    lsd = case.peft_lora()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.from_numpy(lsd[name.replace(".default", "")]))
    pm.eval()
    return [k for k, p in pm.named_parameters() if p.requires_grad]


def _peer_grads_vmap(case: _LlamaCase, batch_size: int):
    """torch.func ``vmap(grad_and_value)`` over ``functional_call``, rows padded to ``seq_len``,
    eager attention with a prepared additive 4D mask, full logits. Returns ``grads(lo, hi) ->
    ([hi - lo, P], losses)``, the parameter names and the GFLOP of ``n`` rows."""
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    from duet_jax.models import hf_state_dict

    cfg, T = case.cfg, case.seq_len
    pm = peer_model(cfg, hf_state_dict(case.model), case.last_layers)
    # eager attention: torch.func has no batching rule for CPU SDPA (it would loop per example)
    pm.get_base_model().set_attn_implementation("eager")
    names = _load_peer_lora(pm, case)
    params = {k: p.detach() for k, p in pm.named_parameters() if p.requires_grad}
    ids, att, _ = peer_tensors(case.tok, T)
    lm = torch.from_numpy(case.tok.loss_mask[:, :T].astype(np.float32))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    neg = torch.finfo(torch.float32).min

    def loss(p, i, a, m):
        # a prepared additive 4D mask (transformers' own mask code branches on the data, which
        # vmap refuses; eager attention adds the mask to the scores, so it must be 0 / -inf-like)
        mask = torch.where(causal & a.bool()[None, :], 0.0, neg)[None, None]
        logits = functional_call(pm, p, (i[None],), {"attention_mask": mask}).logits[0]  # [T, V]
        lp = torch.log_softmax(logits[:-1], -1)
        tok_lp = torch.gather(lp, -1, i[1:, None])[:, 0]  # position t predicts token t + 1
        w = m[1:]
        return -(tok_lp * w).sum() / w.sum().clamp(min=1.0)

    per_ex = vmap(grad_and_value(loss), in_dims=(None, 0, 0, 0))

    def grads(lo, hi):
        gs, ls = [], []
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            g, lv = per_ex(params, ids[s:e], att[s:e], lm[s:e])
            gs.append(torch.cat([g[k].reshape(e - s, -1) for k in names], 1))
            ls.append(lv)
        return torch.cat(gs), torch.cat(ls)

    n = ids.shape[0]
    gflops = train_flops(cfg, rows=n, seq=T, head_positions=n * T, first_trained=cfg.num_layers - case.lora_layers,
                         lora_layers=case.lora_layers) / 1e9
    return grads, names, gflops, {"what": f"torch.func vmap(grad) {batch_size} at a time, padded to {T}, "
                                          "eager attention, full logits"}


def _peer_grads_loop(case: _LlamaCase):
    """LESS's own loop: batch 1, each example at its real length (no padding, no mask), SDPA
    attention (``is_causal``), ``loss = model(input_ids, labels).loss`` (labels -100 off the
    answer), ``torch.autograd.grad``. Returns ``grads(lo, hi)``, names, GFLOP of ``n`` rows, info."""
    import torch

    from duet_jax.models import hf_state_dict

    cfg, T = case.cfg, case.seq_len
    pm = peer_model(cfg, hf_state_dict(case.model), case.last_layers, attn="sdpa")
    names = _load_peer_lora(pm, case)
    plist = [p for _, p in pm.named_parameters() if p.requires_grad]
    ids, _, labels = peer_tensors(case.tok, T)
    lengths = np.minimum(case.tok.lengths, T).astype(int)

    def grads(lo, hi):
        gs, ls = [], []
        for i in range(lo, hi):
            L = int(lengths[i])
            out = pm(input_ids=ids[i:i + 1, :L], labels=labels[i:i + 1, :L])
            g = torch.autograd.grad(out.loss, plist)
            gs.append(torch.cat([x.reshape(-1) for x in g]))
            ls.append(out.loss.detach())
        return torch.stack(gs), torch.stack(ls)

    gflops = sum(train_flops(cfg, rows=1, seq=int(L), head_positions=int(L),
                             first_trained=cfg.num_layers - case.lora_layers, lora_layers=case.lora_layers)
                 for L in lengths) / 1e9
    return grads, names, gflops, {"what": "LESS loop: batch 1 at each example's real length, SDPA "
                                          "(is_causal, no mask), torch.autograd.grad, full logits",
                                  "mean_length": float(lengths.mean())}


def _peer_llama(case: _LlamaCase, *, proj_dim: int, batch_size: int, project_every: int, check_rows,
                grads_kinds=GRADS, projections=PROJECTIONS, dense_cap_gib: float = 4.0,
                matmul_n: int = 2048) -> tuple[dict, dict]:
    """Every peer gradient method over all examples (one pass each after a 1-example warm-up),
    then every projection of the loop's gradients, ``project_every`` rows per call."""

    n = case.tok.input_ids.shape[0]
    info = {"torch_matmul_peak_gflops": torch_matmul_peak_gflops(matmul_n), **peer_versions(),
            "grads": {}, "projections": {}, "project_every": project_every}
    arrays, kept_grads = {}, None
    for kind in grads_kinds:
        if kind == "vmap":
            fn, names, gflops, extra = _peer_grads_vmap(case, batch_size)
        else:
            fn, names, gflops, extra = _peer_grads_loop(case)
        with _count_sdpa() as sdpa:
            fn(0, 1)  # warm-up (allocator, kernels); also shows which attention ran
        t0 = now()
        g, lv = fn(0, n)
        sec = now() - t0
        info["grads"][kind] = {"seconds": sec, "examples_per_s": n / sec, "gflops": gflops,
                               "sdpa_calls_in_one_example": dict(sdpa), **extra}
        arrays[f"{kind}/losses"] = lv.numpy()
        for j, r in enumerate(check_rows):
            arrays[f"{kind}/{j}/grad"] = g[r].numpy().copy()
        arrays["names"] = np.array(names)
        kept_grads = g
        del g
    if kept_grads is not None:
        P = kept_grads.shape[1]
        for name in projections:
            scale, pinfo = 1.0, {}
            if name == "trak":
                pr = torch_trak_projector(P, proj_dim)
            elif name == "sjlt":
                pr = torch_sjlt(P, proj_dim)
            else:
                pr, pinfo = torch_rademacher_kept(P, proj_dim, cap_gib=dense_cap_gib)
                scale = pinfo["scale"]
            if name != "trak":  # TRAK's first call is as slow as any (it generates every time)
                pr(kept_grads[: min(project_every, n)])
            calls = []
            for s in range(0, n, project_every):
                t0 = now()
                pr(kept_grads[s:s + project_every])
                calls.append((now() - t0) * scale)
            info["projections"][name] = {"seconds": float(sum(calls)), "call_s": calls,
                                         "gflops": _proj_gflops("sjlt" if name == "sjlt" else "dense", n, P, proj_dim),
                                         "feasible": pinfo.get("feasible", True), **pinfo}
        info["num_params"] = int(P)
    return info, arrays


def _large_p_check(p: int, k: int, b: int = 2) -> dict:
    """At P > 10M: ``sjlt`` runs for real (a ``P x k`` float32 matrix would not fit in memory),
    and the compiled ``chunked`` program's temporary buffers are read from XLA (never run here)."""
    from duet_jax.influence import make_projector

    out = {"P": p, "k": k, "B": b, "pxk_matrix_gib": p * k * 4 / 2**30}
    x = jnp.ones((b, p), jnp.float32)
    pr = make_projector("sjlt", 0, p, k)
    f = jax.jit(lambda x: pr.apply((), x))
    out["sjlt_s"], _ = median_time(lambda: f(x).block_until_ready(), repeats=2)
    out["sjlt_temp_mib"] = f.lower(x).compile().memory_analysis().temp_size_in_bytes / 2**20
    prc = make_projector("chunked", 0, p, k)
    fc = jax.jit(lambda x: prc.apply((), x))
    out["chunked_temp_mib"] = fc.lower(jax.ShapeDtypeStruct((b, p), jnp.float32)).compile(
        ).memory_analysis().temp_size_in_bytes / 2**20
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _child(side_: str, args: dict, out_path: str) -> None:
    """A fresh interpreter for one side (its own peak memory): prints ``INF_JSON {...}``."""
    if side_ == "large_p":
        info, arrays = _large_p_check(args["large_p"], args["proj_dim"]), {}
    else:
        case = _llama_case_from_spec(args["spec"], args["domain"], args["examples"], args["seq_len"],
                                     args.get("buckets"), args.get("last_layers"))
        after_load = peak_rss_mib()
        if side_ == "ours":
            info, arrays = _ours_llama(case, proj_dim=args["proj_dim"], projector=args["projector"],
                                       chunk_size=args["chunk_size"], repeats=args["repeats"],
                                       check=args["check"])
        else:
            info, arrays = _peer_llama(case, proj_dim=args["proj_dim"], batch_size=args["batch_size"],
                                       project_every=args["project_every"], check_rows=args["check_rows"],
                                       grads_kinds=args["peer_grads"], projections=args["peer_projections"],
                                       dense_cap_gib=args["dense_cap_gib"], matmul_n=args["matmul_n"])
        info.update(after_load_mib=after_load, peak_rss_mib=peak_rss_mib())
    np.savez(out_path, **arrays)
    emit("INF_JSON", info)


def _in_child(side_: str, args: dict, tmp: str) -> tuple[dict, dict]:
    out_path = os.path.join(tmp, f"{side_}.npz")
    info = run_child("duet_jax.bench.influence", "_child", (side_, args, out_path), "INF_JSON")
    if "error" in info:
        raise RuntimeError(f"the {side_} side failed:\n{info['error']}")
    with np.load(out_path) as z:
        return info, {k: z[k] for k in z.files}


def _grad_check(ours: dict, peer: dict, check: int, kind: str) -> dict:
    """Cosine and relative difference of the unprojected gradients, row by row (PEFT names), and
    the per-example losses, ours against the peer gradient method ``kind``."""
    names = [str(x) for x in peer["names"]]
    cos, rel = [], []
    for i in range(check):
        if f"{kind}/{i}/grad" not in peer:
            continue
        a = np.concatenate([ours[f"{i}/{n.replace('.default', '')}"].ravel() for n in names]).astype(np.float64)
        b = peer[f"{kind}/{i}/grad"].astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300)))
        rel.append(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-300)))
    dl = np.abs(np.asarray(ours["losses"], np.float64) - np.asarray(peer[f"{kind}/losses"], np.float64))
    return {"grad_cosine": cos, "grad_rel_diff": rel, "max_abs_loss_diff": float(dl.max()),
            "mean_loss_ours": float(np.mean(ours["losses"])), "mean_loss_peer": float(np.mean(peer[f"{kind}/losses"]))}


def _peer_sides(peer_info: dict, n: int) -> dict:
    """Every (gradient method, projection) combination as a featurize peer."""
    peers = {}
    for g, gi in peer_info["grads"].items():
        for p, pi in peer_info["projections"].items():
            sec = gi["seconds"] + pi["seconds"]
            peers[f"{g}+{p}"] = side(n / sec, seconds=sec, gflops=gi["gflops"] + pi["gflops"],
                                     feasible=bool(pi["feasible"]), grad_s=gi["seconds"], projection_s=pi["seconds"],
                                     what=f"{gi['what']}; projection {p}"
                                          + ("" if pi["feasible"] else " (matrix too large to keep: timed on a "
                                                                       "slice and scaled, never the strongest)"))
    return peers


def run_llama(spec: str = "smollm2-135m-instruct", *, domain: str = "arc_easy", examples: int = 16,
              seq_len: int = 128, proj_dim: int = 8192, projector: str = "sjlt", chunk_size: int | None = None,
              buckets=None, last_layers: int | None = None, batch_size: int = 8, repeats: int = 2, project_every: int = 16, check: int = 2,
              peer: bool = True, peer_grads=GRADS, peer_projections=PROJECTIONS, dense_cap_gib: float = 4.0,
              subprocesses: bool = True, large_p: int | None = 12_000_000, matmul_n: int = 2048,
              projection: bool = True, model=None, tokenizer=None, example_list=None, progress=None) -> dict:
    """The SmolLM2 LoRA case: the run's featurize against every torch peer, same examples and adapter.

    ``subprocesses=True`` runs each side in a fresh interpreter (separate peak memory; the model is
    loaded from ``spec`` there); ``model`` / ``tokenizer`` / ``example_list`` (tests: a tiny random
    model) imply in-process runs.
    """
    say = progress or (lambda m: None)
    if model is not None:
        subprocesses = False
    if peer:
        require_peer()
    chunk_size = chunk_size or min(64, examples)
    _influence_config(proj_dim, projector, chunk_size)  # the run's checks, before anything runs
    out = {"model": spec if model is None else "custom", "domain": domain, "examples": examples,
           "seq_len": seq_len, "proj_dim": proj_dim, "projector": projector, "chunk_size": chunk_size,
           "peer_batch_size": batch_size, "repeats": repeats, **machine_info(),
           "load_average_start": load_average(),
           "last_layers": last_layers,
           "lora": f"r=8, alpha=16, q,k,v,o of {'every layer' if last_layers is None else f'the last {last_layers} layers'}"
                   "; B ~ N(0, 0.02^2)",
           "loss": "mean NLL over the answer (loss-mask) tokens of one example"}
    peak = MatmulPeak(matmul_n)
    say(f"matmul peak {peak.sample():.1f} GFLOP/s")
    args = dict(spec=spec, domain=domain, examples=examples, seq_len=seq_len, proj_dim=proj_dim,
                projector=projector, chunk_size=chunk_size, buckets=list(buckets) if buckets else None,
                last_layers=last_layers,
                batch_size=batch_size, repeats=repeats, check=check, project_every=project_every,
                large_p=large_p, peer_grads=list(peer_grads), peer_projections=list(peer_projections),
                dense_cap_gib=dense_cap_gib, matmul_n=matmul_n)
    with tempfile.TemporaryDirectory(prefix="duet-bench-if-") as tmp:
        if subprocesses:
            ours_info, ours_arr = _in_child("ours", args, tmp)
        else:
            case = _LlamaCase(model, tokenizer, example_list, seq_len, buckets=buckets, last_layers=last_layers)
            ours_info, ours_arr = _ours_llama(case, proj_dim=proj_dim, projector=projector,
                                              chunk_size=chunk_size, repeats=repeats, check=check)
        say(f"ours: {ours_info['examples_per_s']:.3f} ex/s (chunks of {chunk_size} at lengths "
            f"{ours_info['chunk_lengths']}, compile {ours_info['compile_s']:.0f} s)")
        peer_info, peer_arr = None, None
        if peer:
            args["check_rows"] = [int(r) for r in ours_arr["check_rows"]]
            if subprocesses:
                peer_info, peer_arr = _in_child("peer", args, tmp)
            else:
                peer_info, peer_arr = _peer_llama(
                    case, proj_dim=proj_dim, batch_size=batch_size, project_every=project_every,
                    check_rows=args["check_rows"], grads_kinds=peer_grads, projections=peer_projections,
                    dense_cap_gib=dense_cap_gib, matmul_n=matmul_n)
            peak.add(peer_info["torch_matmul_peak_gflops"], "torch (peer process)")
            say("peers: " + ", ".join(f"{k} gradients {v['examples_per_s']:.3f} ex/s"
                                      for k, v in peer_info["grads"].items())
                + "; projections " + ", ".join(f"{k} {v['seconds']:.2f} s"
                                               for k, v in peer_info["projections"].items()))
        if large_p:
            out["large_p"] = (_in_child("large_p", args, tmp)[0] if subprocesses
                              else _large_p_check(large_p, proj_dim))
    n = ours_info["feature_shape"][0]
    out["num_params"] = ours_info["num_params"]
    out["examples"] = n
    out["ours"] = ours_info
    out["ours_examples_per_s"] = ours_info["examples_per_s"]
    out["ours_peak_rss_mib"] = ours_info.get("peak_rss_mib", peak_rss_mib())
    proj_alone = _projection_bench(out["num_params"], proj_dim, min(project_every, n), peer=False,
                                   ours=projector) if projection else None
    peak.sample()
    P = out["num_params"]
    ours_side = side(ours_info["examples_per_s"], seconds=ours_info["seconds"], gflops=ours_info["gflops"],
                     what=f"the run's featurize ({projector}): {ours_info['path']}")
    peers = {}
    if peer_info:
        out["peer"] = peer_info
        out["peer_peak_rss_mib"] = peer_info.get("peak_rss_mib", peak_rss_mib())
        peers = _peer_sides(peer_info, n)
        out["check"] = {k: _grad_check(ours_arr, peer_arr, check, k) for k in peer_info["grads"]}
        if "vmap+trak" in peers:  # the earlier single peer, kept under its old names
            out["peer_examples_per_s"] = peers["vmap+trak"]["examples_per_s"]
            out["ratio"] = out["ours_examples_per_s"] / out["peer_examples_per_s"]
        for k, gi in peer_info["grads"].items():
            out[f"peer_{k}_grad_only_examples_per_s"] = gi["examples_per_s"]
    out.setdefault("peer_examples_per_s", None)
    out.setdefault("ratio", None)
    cases = [compare("featurize", ours_side, peers, peak.peak, unit="examples/s",
                     check=out.get("check"))]
    if proj_alone:
        B = proj_alone["B"]
        ours_p = side(B / proj_alone["ours_s"], seconds=proj_alone["ours_s"],
                      gflops=_proj_gflops(projector, B, P, proj_dim), what=f"our {projector} projection (jit)")
        ppeers = {}
        if peer_info:
            for name, pi in peer_info["projections"].items():
                s1 = float(np.median(pi["call_s"]))
                rows1 = min(project_every, n)
                ppeers[name] = side(rows1 / s1, seconds=s1, gflops=pi["gflops"] * rows1 / n, feasible=pi["feasible"],
                                    what=f"torch {name}")
        cases.append(compare("projection", ours_p, ppeers, peak.peak, unit="rows/s", details=proj_alone))
        out["projection"] = proj_alone
    out["cases"] = cases
    f = cases[0]
    out.update(strongest_peer=f["strongest_peer"], ratio_vs_strongest=f["ratio_vs_strongest"],
               ours_fraction_of_matmul_peak=f["ours"]["fraction_of_matmul_peak"], **peak.info())
    if "vmap+trak" in f["peers"]:
        gi = peer_info["grads"]["vmap"]
        out["peer_grad_only_examples_per_s"] = gi["examples_per_s"]
        out["ratio_vs_peer_grad_only"] = out["ours_examples_per_s"] / gi["examples_per_s"]
        out["peer_grad_fraction_of_matmul_peak"] = gi["gflops"] / gi["seconds"] / peak.peak
    out["load_average_end"] = load_average()
    return out


def _projection_bench(p: int, k: int, b: int, peer: bool, ours: str = "sjlt") -> dict:
    """``[b, p] -> k``: our SJLT, chunked Rademacher and dense matmul (scaled from a slice), and
    ``ours_s`` for the configured projector; with ``peer`` the three torch projections too."""
    from duet_jax.influence import make_projector

    x = jax.random.normal(jax.random.PRNGKey(0), (b, p), jnp.float32)
    res = {"P": p, "k": k, "B": b}
    for name in ("sjlt", "chunked"):
        pr = make_projector(name, 0, p, k)
        f = jax.jit(lambda x, pr=pr: pr.apply((), x))
        res[f"{name}_s"], _ = median_time(lambda f=f: f(x).block_until_ready())
    pd = min(p, max(1, 2**26 // k))  # dense matrix kept under 256 MB
    pr = make_projector("dense", 0, pd, k)
    m = pr.init()
    f = jax.jit(lambda x, m: x @ m)
    res["dense_P"] = pd
    res["dense_s_scaled"] = median_time(lambda: f(x[:, :pd], m).block_until_ready())[0] * p / pd
    if f"{ours}_s" in res:
        res["ours_s"] = res[f"{ours}_s"]
    elif ours == "dense":
        res["ours_s"] = res["dense_s_scaled"]
    else:
        pr = make_projector(ours, 0, p, k)
        st = pr.init()
        f = jax.jit(lambda x, st, pr=pr: pr.apply(st, x))
        res["ours_s"], _ = median_time(lambda: f(x, st).block_until_ready())
    if peer:
        import torch

        xt = torch.from_numpy(np.array(x))
        kept, kinfo = torch_rademacher_kept(p, k)
        for name, pr in (("trak", torch_trak_projector(p, k)), ("sjlt_torch", torch_sjlt(p, k)),
                         ("rademacher_kept", kept)):
            t, _ = median_time(lambda pr=pr: pr(xt), repeats=1)
            res[f"peer_{name}_s"] = t * (kinfo["scale"] if name == "rademacher_kept" else 1.0)
        res["peer_rademacher_kept_feasible"] = kinfo["feasible"]
        res["ratio_sjlt_vs_peer"] = res["peer_trak_s"] / res["sjlt_s"]
        res["ratio_chunked_vs_peer"] = res["peer_trak_s"] / res["chunked_s"]
        res["ratio_sjlt_vs_peer_sjlt_torch"] = res["peer_sjlt_torch_s"] / res["sjlt_s"]
    res["ratio_sjlt_vs_dense"] = res["dense_s_scaled"] / res["sjlt_s"]
    return res


def main(args) -> int:
    if args.quick or args.model == "mlp":
        return _main_mlp(args)
    progress = None if args.json else (lambda m: print(m, flush=True))
    buckets = tuple(int(x) for x in args.buckets.split(",")) if args.buckets else None
    r = run_llama(args.model, domain=args.domain, examples=args.examples, seq_len=args.seq_len,
                  proj_dim=args.proj_dim or 8192, projector=args.projector, chunk_size=args.chunk_size,
                  buckets=buckets, last_layers=args.last_layers, batch_size=args.batch_size, repeats=args.repeats, peer=not args.no_peer,
                  peer_grads=_csv(args.peer_grads, GRADS), peer_projections=_csv(args.peer_projections, PROJECTIONS),
                  dense_cap_gib=args.dense_cap_gib, large_p=args.large_p or None, progress=progress)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(_llama_summary(r))
    return 0


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _case_lines(c: dict, unit: str) -> list[str]:
    o = c["ours"]
    lines = [f"  {c['name']}: ours {o['examples_per_s']:.3f} {unit} ({_pct(o['fraction_of_matmul_peak'])} of peak)"]
    for k, p in sorted(c["peers"].items(), key=lambda kv: -(kv[1]["examples_per_s"] or 0)):
        tag = "" if p.get("feasible", True) else " (not feasible: scaled from a slice)"
        r = c["ratios"].get(k)
        lines.append(f"    peer {k:<22} {p['examples_per_s']:.3f} {unit} ({_pct(p['fraction_of_matmul_peak'])} "
                     f"of peak), ours / it {'-' if r is None else f'{r:.2f}x'}{tag}")
    if c["strongest_peer"]:
        lines.append(f"    strongest peer: {c['strongest_peer']}, ratio {c['ratio_vs_strongest']:.2f}x")
    return lines


def _llama_summary(r: dict) -> str:
    o = r["ours"]
    la0, la1 = r.get("load_average_start") or [0.0], r.get("load_average_end") or [0.0]
    lines = [f"{r['model']} LoRA ({r['num_params']} params) on {r['examples']} {r['domain']} examples, "
             f"max_length {r['seq_len']} -> k={r['proj_dim']}, {r['device']}, {r['cpu_count']} CPUs, load "
             f"{la0[0]:.1f} -> {la1[0]:.1f}, matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s",
             f"  ours ({r['projector']}): chunks of {o['chunk_size']} rows at lengths {o['chunk_lengths']} "
             f"(buckets {o['buckets']}), peak RSS {r['ours_peak_rss_mib']:.0f} MiB"]
    for c in r["cases"]:
        lines += _case_lines(c, c.get("unit", "ex/s"))
    if r.get("check"):
        for k, c in r["check"].items():
            lines.append(f"  check vs {k}: gradient cosine {', '.join(f'{x:.6f}' for x in c['grad_cosine'])}, "
                         f"max |loss diff| {c['max_abs_loss_diff']:.1e} (mean loss {c['mean_loss_ours']:.4f} "
                         f"vs {c['mean_loss_peer']:.4f})")
        lines.append(f"  peer peak RSS {r['peer_peak_rss_mib']:.0f} MiB")
    if "large_p" in r:
        lp = r["large_p"]
        lines.append(f"  P={lp['P']} -> {lp['k']} (a P x k matrix: {lp['pxk_matrix_gib']:.0f} GiB): sjlt "
                     f"{lp['sjlt_s']:.2f} s for {lp['B']} rows, peak RSS {lp['peak_rss_mib']:.0f} MiB; "
                     f"XLA temp buffers sjlt {lp['sjlt_temp_mib']:.0f} MiB, chunked {lp['chunked_temp_mib']:.0f} MiB")
    return "\n".join(lines)


def _main_mlp(args) -> int:
    res = run(quick=args.quick, proj_dim=args.proj_dim, projector=args.projector,
              peer=not args.no_peer)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    pj = res["projection"]
    print(f"matmul peak: {res['matmul_peak_gflops']:.1f} GFLOP/s on {res['device']}")
    print(f"projection [16, {pj['P']}] -> {pj['k']}: sjlt {pj['sjlt_s']*1e3:.1f} ms, "
          f"chunked {pj['chunked_s']*1e3:.1f} ms, dense (scaled) {pj['dense_s_scaled']*1e3:.1f} ms"
          + (f", torch TRAK-style {pj['peer_trak_s']*1e3:.1f} ms, torch SJLT {pj['peer_sjlt_torch_s']*1e3:.1f} ms"
             if "peer_trak_s" in pj else ""))
    print(f"featurize ({res['num_params']} LoRA params -> {res['proj_dim']}):")
    for line in _case_lines(res["cases"][0], "ex/s"):
        print(line)
    return 0
