"""``duet-jax bench influence``: featurize throughput and projection speed against a PyTorch peer.

Measured in one run on this machine:

1. the matmul peak (a large float32 ``jnp`` matmul), to report fractions of it;
2. the projection alone, ``[B, P] -> [B, k]``: our SJLT, our hashed chunked Rademacher and a dense
   matmul (small P only) against a TRAK-style PyTorch chunked Rademacher projector (it regenerates
   the ``P x k`` matrix block by block from a seeded generator on every call);
3. featurize throughput (examples/s: per-example gradients + projection to k) of a LoRA model
   against a LESS-style pipeline (``torch.func.vmap(grad)`` then the TRAK-style projection).

The model is pluggable: :func:`featurize_throughput` takes any ``loss_fn(params, example)``,
params and a batch. The default is a small LoRA MLP over token sequences, written identically in
JAX and PyTorch (the SmolLM2-135M LoRA case plugs in the same way once its torch twin exists).
JSON fields: ``ours_examples_per_s``, ``peer_examples_per_s``, ``ratio`` (ours / peer) and details.
"""

from __future__ import annotations

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

HELP = "influence featurize throughput and projection speed vs a torch.func + TRAK-style peer"

__all__ = ["HELP", "add_arguments", "main", "featurize_throughput", "matmul_peak_gflops"]


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 8192; quick 1024)")
    parser.add_argument("--projector", default="sjlt", help="our projector for featurize")
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peer")


def _time(fn, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def matmul_peak_gflops(n: int = 2048) -> float:
    """float32 GFLOP/s of an ``n x n @ n x n`` jitted matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = _time(lambda: f(a).block_until_ready())
    return 2 * n**3 / t / 1e9


# ------------------------------------------------------------------ the default LoRA model
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
    """torch.func per-example gradients of the same model: returns ``fn() -> [B, P]``."""
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

    def run(bs: int = 16):
        outs = []
        for s in range(0, x.shape[0], bs):
            g = per_ex(p, x[s : s + bs], y[s : s + bs])
            outs.append(torch.cat([g["a"].flatten(1), g["b"].flatten(1)], 1))
        return torch.cat(outs)

    return run


def torch_trak_projector(p: int, k: int, seed: int = 0, block: int = 65536):
    """TRAK-style CPU projection: Rademacher blocks regenerated from a seeded generator per call."""
    import torch

    def project(g):  # g: [B, P] torch float32
        out = torch.zeros(g.shape[0], k)
        gen = torch.Generator()
        for i, s in enumerate(range(0, p, block)):
            e = min(s + block, p)
            gen.manual_seed(seed + i)
            m = torch.randint(0, 2, (e - s, k), generator=gen, dtype=torch.float32) * 2 - 1
            out += g[:, s:e] @ m
        return out / k**0.5

    return project


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
    t = _time(lambda: scorer.featurize(params, batch).block_until_ready())
    flops = None
    try:
        p = scorer._dim(params)
        proj, state, fn = scorer._get(p)
        ca = fn.lower(params, batch, None, state).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops")) if ca and ca.get("flops") else None
    except Exception:  # cost analysis is best effort
        flops = None
    return {"examples_per_s": b / t, "seconds": t, "flops": flops,
            "num_params": scorer._dim(params)}


def _projection_bench(p: int, k: int, b: int, peer: bool) -> dict:
    from duet_jax.influence import make_projector

    x = jax.random.normal(jax.random.PRNGKey(0), (b, p), jnp.float32)
    res = {"P": p, "k": k, "B": b}
    for name in ("sjlt", "chunked"):
        pr = make_projector(name, 0, p, k)
        f = jax.jit(lambda x, pr=pr: pr.apply((), x))
        res[f"{name}_s"] = _time(lambda f=f: f(x).block_until_ready())
    pd = min(p, max(1, 2**26 // k))  # dense matrix kept under 256 MB
    pr = make_projector("dense", 0, pd, k)
    m = pr.init()
    f = jax.jit(lambda x, m: x @ m)
    res["dense_P"] = pd
    res["dense_s_scaled"] = _time(lambda: f(x[:, :pd], m).block_until_ready()) * p / pd
    if peer:
        import torch

        proj = torch_trak_projector(p, k)
        xt = torch.from_numpy(np.array(x))
        res["peer_trak_s"] = _time(lambda: proj(xt), repeats=1)
        res["ratio_sjlt_vs_peer"] = res["peer_trak_s"] / res["sjlt_s"]
        res["ratio_chunked_vs_peer"] = res["peer_trak_s"] / res["chunked_s"]
    res["ratio_sjlt_vs_dense"] = res["dense_s_scaled"] / res["sjlt_s"]
    return res


def run(quick: bool = False, proj_dim: int | None = None, projector: str = "sjlt",
        peer: bool = True) -> dict:
    k = proj_dim or (1024 if quick else 8192)
    peak = matmul_peak_gflops(1024 if quick else 2048)
    out = {"device": str(jax.devices()[0]), "matmul_peak_gflops": peak, "proj_dim": k,
           "projector": projector, "model": "lora_mlp (pluggable)"}
    out["projection"] = _projection_bench(100_000 if quick else 920_000, k, 16, peer)

    d, n = (128, 32) if quick else (256, 64)
    loss_fn, lora, frozen, make_batch = lora_mlp(d=d, rank=8, layers=4, seq=32)
    batch = make_batch(n)
    ours = featurize_throughput(loss_fn, lora, batch, proj_dim=k, projector=projector)
    out["num_params"] = ours["num_params"]
    out["ours_examples_per_s"] = ours["examples_per_s"]
    if ours["flops"]:
        out["ours_fraction_of_matmul_peak"] = ours["flops"] / ours["seconds"] / 1e9 / peak
    if peer:
        grads = _torch_lora_mlp_grads(frozen, lora, batch)
        proj = torch_trak_projector(ours["num_params"], k)
        t = _time(lambda: proj(grads()), repeats=1)
        t_grad = _time(grads, repeats=2)
        out["peer_examples_per_s"] = n / t
        out["peer_grad_only_examples_per_s"] = n / t_grad
        out["ratio"] = out["ours_examples_per_s"] / out["peer_examples_per_s"]
    else:
        out["peer_examples_per_s"] = None
        out["ratio"] = None
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(args) -> int:
    res = run(quick=args.quick, proj_dim=args.proj_dim, projector=args.projector,
              peer=not args.no_peer)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    pj = res["projection"]
    print(f"matmul peak: {res['matmul_peak_gflops']:.1f} GFLOP/s on {res['device']}")
    print(f"projection [16, {pj['P']}] -> {pj['k']}: sjlt {pj['sjlt_s']*1e3:.1f} ms, "
          f"chunked {pj['chunked_s']*1e3:.1f} ms, dense (scaled) {pj['dense_s_scaled']*1e3:.1f} ms"
          + (f", torch TRAK-style {pj['peer_trak_s']*1e3:.1f} ms" if "peer_trak_s" in pj else ""))
    print(f"featurize ({res['num_params']} LoRA params -> {res['proj_dim']}): "
          f"ours {res['ours_examples_per_s']:.1f} ex/s"
          + (f", peer {res['peer_examples_per_s']:.1f} ex/s, ratio {res['ratio']:.2f}x"
             if res["ratio"] else ""))
    if "ours_fraction_of_matmul_peak" in res:
        print(f"ours at {100 * res['ours_fraction_of_matmul_peak']:.0f}% of the matmul peak")
    return 0
