"""``duet-jax bench influence``: featurize throughput and projection speed against a PyTorch peer.

Measured in one run on this machine:

1. the matmul peak (a large float32 ``jnp`` matmul, at the start and the end; the larger counts),
   to report fractions of it;
2. featurize throughput (examples/s: per-example gradients + projection to k = 8192) of
   SmolLM2-135M-Instruct with LoRA r=8 on q,k,v,o of all 30 layers (921,600 LoRA parameters),
   sequence 128, real QA examples (``arc_easy`` train split), loss = mean NLL over the answer
   tokens of one example, against a LESS-style PyTorch pipeline on the same weights, adapter and
   examples:

   - ours: :class:`~duet_jax.influence.InfluenceScorer` (``sjlt``) over
     :func:`~duet_jax.influence.domains.example_loss_fn` with the frozen weights passed as
     ``context``, ``vmap(grad)`` 8 examples at a time; rows sorted by length and each chunk padded
     to its longest row rounded up to 16 (:func:`~duet_jax.influence.domains.featurize_pool`),
     the LM head only at the answer slots;
   - peer: transformers' ``LlamaForCausalLM`` + PEFT LoRA, ``torch.func.vmap(grad)`` over
     ``functional_call`` (8 at a time, rows padded to 128, full logits), then TRAK's CPU
     Rademacher projector (:func:`torch_trak_projector`) every 16 examples, as LESS does;
   - a check that both compute the same thing: cosine of the unprojected gradients of two
     examples, and every example's loss;
   - each side in a fresh interpreter (its own peak RSS).
3. the projection alone, ``[16, P] -> [16, k]``: our SJLT, our hashed chunked Rademacher and a dense
   matmul (scaled from a slice) against the TRAK-style torch projector;
4. at P = 12M: SJLT runs (a ``P x k`` matrix would need 366 GiB) and XLA's temporaries of the
   compiled SJLT and chunked projections are reported.

``--model mlp`` / ``--quick``: the earlier small LoRA MLP case, written identically in JAX and
PyTorch (:func:`featurize_throughput` takes any ``loss_fn(params, example)``).
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

__all__ = ["HELP", "add_arguments", "main", "featurize_throughput", "matmul_peak_gflops", "run", "run_llama",
           "torch_trak_projector"]


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC",
                        help="the LoRA model (default SmolLM2-135M-Instruct), or 'mlp' for the "
                             "small LoRA MLP")
    parser.add_argument("--quick", action="store_true", help="the LoRA MLP at small sizes (seconds)")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 8192; quick 1024)")
    parser.add_argument("--projector", default="sjlt", help="our projector for featurize")
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peer")
    parser.add_argument("--domain", default="arc_easy", help="built-in QA domain (train split)")
    parser.add_argument("--examples", type=int, default=16, help="examples featurized per side")
    parser.add_argument("--seq-len", type=int, default=128, help="max_length; the peer pads to it")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per vmapped chunk (both)")
    parser.add_argument("--bucket", type=int, default=16, help="ours: pad a chunk to a multiple of this")
    parser.add_argument("--repeats", type=int, default=2, help="our timed reps (the peer runs once)")
    parser.add_argument("--large-p", type=int, default=12_000_000,
                        help="P of the bounded-memory projection check (0: skip)")


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


# ------------------------------------------------------------------ the SmolLM2-135M LoRA case
def _nonzero_b(lora, scale: float, seed: int):
    """LoRA state with ``lora_b ~ N(0, scale^2)`` (a fresh adapter has B = 0, so every A-gradient
    would be 0; a proxy adapter after fine-tuning has both non-zero)."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        if "lora_b" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.normal(0.0, scale, np.shape(x)).astype(np.float32))
        return x

    return jax.tree_util.tree_map_with_path(f, lora)


class _LlamaCase:
    """Both sides' inputs: the model with LoRA r=8 (alpha 16) on q,k,v,o of every layer, B
    non-zero, and the examples tokenized once (``max_length = seq_len``)."""

    def __init__(self, model, tokenizer, examples, seq_len: int, b_scale: float = 0.02, seed: int = 0):
        from duet_jax.bench.finetune import ATTN, _with_lora
        from duet_jax.data import EncodeConfig, encode_examples

        self.model, self.cfg, self.seq_len = model, model.config, seq_len
        self.tok = encode_examples(examples, tokenizer, EncodeConfig(max_length=seq_len, buckets=(seq_len,)))
        g, lora, frozen, _ = _with_lora(model, ATTN, None)
        self.g, self.lora, self.frozen = g, _nonzero_b(lora, b_scale, seed), frozen
        self.num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.lora)))

    def peft_lora(self) -> dict:
        from flax import nnx

        from duet_jax.models.lora import peft_state_dict

        return peft_state_dict(nnx.merge(self.g, self.lora, self.frozen))


def _llama_case_from_spec(spec: str, domain: str, n: int, seq_len: int) -> _LlamaCase:
    from duet_jax.bench.finetune import _examples
    from duet_jax.data import load_tokenizer
    from duet_jax.models import load_model

    return _LlamaCase(load_model(spec, dtype="float32"), load_tokenizer(spec), _examples(domain, n), seq_len)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ours_llama(case: _LlamaCase, *, proj_dim: int, projector: str, batch_size: int, bucket: int,
                repeats: int, check: int) -> tuple[dict, dict]:
    """Our featurize on the case: ``(info, arrays)``; arrays: ``losses [n]``, ``check_rows``, and
    the unprojected gradients of ``check`` rows under their PEFT names."""
    from flax import nnx

    from duet_jax.bench.finetune import train_flops
    from duet_jax.influence import InfluenceScorer
    from duet_jax.influence.domains import example_loss_fn, featurize_pool, length_chunks
    from duet_jax.models.lora import peft_state_dict
    from duet_jax.train import build_pool

    cfg = case.cfg
    pool, _ = build_pool(case.tok, length=case.seq_len)
    n = len(pool)
    loss = example_loss_fn(case.g, 0)
    scorer = InfluenceScorer(loss, proj_dim=proj_dim, projector=projector, batch_size=batch_size,
                             loss_mask=lambda ex: jnp.sum(ex.loss_mask))
    chunks = length_chunks(pool, batch_size, bucket)
    run_once = lambda: featurize_pool(scorer, case.lora, pool, case.frozen, chunks=chunks, return_flags=True)
    t0 = time.perf_counter()
    feats, valid = run_once()
    compile_s = time.perf_counter() - t0
    reps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        reps.append(time.perf_counter() - t0)
    sec = float(np.median(reps))
    A = pool.answer_slots
    flops = sum(train_flops(cfg, rows=batch_size, seq=sub.length, head_positions=batch_size * A,
                            first_trained=0, lora_layers=cfg.num_layers) for _, sub in chunks)
    # not timed: per-example losses (full length) and the unprojected gradients of the first
    # `check` rows of the shortest chunk, exactly as featurize differentiates them
    host = jax.tree.map(np.asarray, pool)
    losses = np.asarray(jax.jit(lambda lo, b, fr: jax.lax.map(lambda ex: loss(lo, ex, fr), b, batch_size=batch_size))(
        case.lora, host, case.frozen))
    rows0, sub0 = chunks[0]
    c = min(check, rows0.size)
    sub_c = jax.tree.map(lambda a: a[:c], sub0)
    vg = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, None)))(case.lora, sub_c, case.frozen)
    grads = {}
    for i in range(c):
        gi = jax.tree.map(lambda x, i=i: x[i], vg)
        for name, v in peft_state_dict(nnx.merge(case.g, gi, case.frozen)).items():
            grads[f"{i}/{name}"] = v
    info = {"examples_per_s": n / sec, "seconds": sec, "num_params": case.num_params, "reps_s": reps, "compile_s": compile_s,
            "chunks": [[int(r.size), int(sub.length)] for r, sub in chunks], "answer_slots": A,
            "gflops": flops / 1e9, "valid": int(np.sum(valid)), "feature_shape": list(feats.shape),
            "mean_padded_length": float(np.mean([sub.length for _, sub in chunks]))}
    return info, {"losses": losses, "check_rows": rows0[:c], **grads}


def _peer_llama(case: _LlamaCase, *, proj_dim: int, batch_size: int, project_every: int,
                check_rows) -> tuple[dict, dict]:
    """LESS-style: PEFT LoRA on transformers' LlamaForCausalLM, per-example gradients by
    ``torch.func.vmap(grad)`` over ``functional_call`` (full logits, rows padded to ``seq_len``),
    the TRAK-style projection every ``project_every`` examples (LESS's ``project_interval``)."""
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    from duet_jax.bench.finetune import _peer_model, _peer_tensors, train_flops
    from duet_jax.models import hf_state_dict

    cfg, T = case.cfg, case.seq_len
    pm = _peer_model(cfg, hf_state_dict(case.model), None)
    # eager attention: torch.func has no batching rule for CPU SDPA (it would loop per example)
    pm.get_base_model().set_attn_implementation("eager")
    lsd = case.peft_lora()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.from_numpy(lsd[name.replace(".default", "")]))
    pm.eval()
    names = [k for k, p in pm.named_parameters() if p.requires_grad]
    params = {k: p.detach() for k, p in pm.named_parameters() if p.requires_grad}
    P = int(sum(v.numel() for v in params.values()))
    ids, att, _ = _peer_tensors(case.tok, T)
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

    proj = torch_trak_projector(P, proj_dim)
    n = ids.shape[0]
    grads(0, 1)  # warm-up (allocator, kernels)
    t_grad = t_proj = 0.0
    losses, check, calls = [], {}, []
    for s in range(0, n, project_every):
        e = min(s + project_every, n)
        t0 = time.perf_counter()
        g, lv = grads(s, e)
        t1 = time.perf_counter()
        proj(g)
        t2 = time.perf_counter()
        t_grad, t_proj = t_grad + t1 - t0, t_proj + t2 - t1
        calls.append(t2 - t1)
        losses.append(lv.numpy())
        for j, r in enumerate(check_rows):
            if s <= r < e:
                check[f"{j}/grad"] = g[r - s].numpy().copy()
        del g
    flops = train_flops(cfg, rows=n, seq=T, head_positions=n * T, first_trained=0,
                        lora_layers=cfg.num_layers)
    info = {"examples_per_s": n / (t_grad + t_proj), "grad_only_examples_per_s": n / t_grad,
            "grad_s": t_grad, "projection_s": t_proj, "projection_call_s": calls,
            "projection_rows_per_call": project_every, "grad_gflops": flops / 1e9, "num_params": P,
            "torch_threads": torch.get_num_threads()}
    return info, {"losses": np.concatenate(losses), "names": np.array(names), **check}


def _large_p_check(p: int, k: int, b: int = 2) -> dict:
    """At P > 10M: ``sjlt`` runs for real (a ``P x k`` float32 matrix would not fit in memory),
    and the compiled ``chunked`` program's temporary buffers are read from XLA (never run here)."""
    from duet_jax.influence import make_projector

    out = {"P": p, "k": k, "B": b, "pxk_matrix_gib": p * k * 4 / 2**30}
    x = jnp.ones((b, p), jnp.float32)
    pr = make_projector("sjlt", 0, p, k)
    f = jax.jit(lambda x: pr.apply((), x))
    out["sjlt_s"] = _time(lambda: f(x).block_until_ready(), repeats=2)
    out["sjlt_temp_mib"] = f.lower(x).compile().memory_analysis().temp_size_in_bytes / 2**20
    prc = make_projector("chunked", 0, p, k)
    fc = jax.jit(lambda x: prc.apply((), x))
    out["chunked_temp_mib"] = fc.lower(jax.ShapeDtypeStruct((b, p), jnp.float32)).compile(
        ).memory_analysis().temp_size_in_bytes / 2**20
    out["peak_rss_mib"] = _rss_mib()
    return out


def _child(side: str, args: dict, out_path: str) -> None:
    """A fresh interpreter for one side (its own peak memory): prints ``INF_JSON {...}``."""
    if side == "large_p":
        info, arrays = _large_p_check(args["large_p"], args["proj_dim"]), {}
    else:
        case = _llama_case_from_spec(args["spec"], args["domain"], args["examples"], args["seq_len"])
        after_load = _rss_mib()
        if side == "ours":
            info, arrays = _ours_llama(case, proj_dim=args["proj_dim"], projector=args["projector"],
                                       batch_size=args["batch_size"], bucket=args["bucket"],
                                       repeats=args["repeats"], check=args["check"])
        else:
            info, arrays = _peer_llama(case, proj_dim=args["proj_dim"], batch_size=args["batch_size"],
                                       project_every=args["project_every"], check_rows=args["check_rows"])
        info.update(after_load_mib=after_load, peak_rss_mib=_rss_mib())
    np.savez(out_path, **arrays)
    print("INF_JSON " + json.dumps(info), flush=True)


def _in_child(side: str, args: dict, tmp: str) -> tuple[dict, dict]:
    import os
    import subprocess
    import sys

    out_path = os.path.join(tmp, f"{side}.npz")
    code = f"from duet_jax.bench.influence import _child; _child({side!r}, {args!r}, {out_path!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith("INF_JSON ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"the {side} side failed:\n{(p.stderr or p.stdout)[-3000:]}")
    with np.load(out_path) as z:
        return json.loads(line[-1][len("INF_JSON "):]), {k: z[k] for k in z.files}


def _grad_check(ours: dict, peer: dict, check: int) -> dict:
    """Cosine and relative difference of the unprojected gradients, row by row (PEFT names)."""
    names = [str(x) for x in peer["names"]]
    cos, rel = [], []
    for i in range(check):
        if f"{i}/grad" not in peer:
            continue
        a = np.concatenate([ours[f"{i}/{n.replace('.default', '')}"].ravel() for n in names]).astype(np.float64)
        b = peer[f"{i}/grad"].astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300)))
        rel.append(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-300)))
    dl = np.abs(np.asarray(ours["losses"], np.float64) - np.asarray(peer["losses"], np.float64))
    return {"grad_cosine": cos, "grad_rel_diff": rel, "max_abs_loss_diff": float(dl.max()),
            "mean_loss_ours": float(np.mean(ours["losses"])), "mean_loss_peer": float(np.mean(peer["losses"]))}


def run_llama(spec: str = "smollm2-135m-instruct", *, domain: str = "arc_easy", examples: int = 16,
              seq_len: int = 128, proj_dim: int = 8192, projector: str = "sjlt", batch_size: int = 8,
              bucket: int = 16, repeats: int = 2, project_every: int = 16, check: int = 2,
              peer: bool = True, subprocesses: bool = True, large_p: int | None = 12_000_000,
              matmul_n: int = 2048, projection: bool = True, model=None, tokenizer=None,
              example_list=None, progress=None) -> dict:
    """The SmolLM2 LoRA case: ours vs the LESS-style peer on the same examples and adapter.

    ``subprocesses=True`` runs each side in a fresh interpreter (separate peak memory; the model is
    loaded from ``spec`` there); ``model`` / ``tokenizer`` / ``example_list`` (tests: a tiny random
    model) imply in-process runs.
    """
    import os
    import tempfile

    say = progress or (lambda m: None)
    if model is not None:
        subprocesses = False
    out = {"model": spec if model is None else "custom", "domain": domain, "examples": examples,
           "seq_len": seq_len, "proj_dim": proj_dim, "projector": projector, "batch_size": batch_size,
           "bucket": bucket, "repeats": repeats, "device": str(jax.devices()[0]),
           "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
           "lora": "r=8, alpha=16, q,k,v,o of every layer; B ~ N(0, 0.02^2)",
           "loss": "mean NLL over the answer (loss-mask) tokens of one example"}
    peak = matmul_peak_gflops(matmul_n)
    say(f"matmul peak {peak:.1f} GFLOP/s")
    args = dict(spec=spec, domain=domain, examples=examples, seq_len=seq_len, proj_dim=proj_dim,
                projector=projector, batch_size=batch_size, bucket=bucket, repeats=repeats, check=check,
                project_every=project_every, large_p=large_p)
    with tempfile.TemporaryDirectory(prefix="duet-bench-if-") as tmp:
        if subprocesses:
            ours_info, ours_arr = _in_child("ours", args, tmp)
        else:
            case = _LlamaCase(model, tokenizer, example_list, seq_len)
            ours_info, ours_arr = _ours_llama(case, proj_dim=proj_dim, projector=projector,
                                              batch_size=batch_size, bucket=bucket, repeats=repeats,
                                              check=check)
        say(f"ours: {ours_info['examples_per_s']:.3f} ex/s (chunks [rows, length] {ours_info['chunks']}, "
            f"compile {ours_info['compile_s']:.0f} s)")
        peer_info, peer_arr = None, None
        if peer:
            args["check_rows"] = [int(r) for r in ours_arr["check_rows"]]
            if subprocesses:
                peer_info, peer_arr = _in_child("peer", args, tmp)
            else:
                peer_info, peer_arr = _peer_llama(case, proj_dim=proj_dim, batch_size=batch_size,
                                                  project_every=project_every, check_rows=args["check_rows"])
            say(f"peer: {peer_info['examples_per_s']:.3f} ex/s (gradients alone "
                f"{peer_info['grad_only_examples_per_s']:.3f} ex/s, projection {peer_info['projection_s']:.0f} s)")
        if large_p:
            out["large_p"] = (_in_child("large_p", args, tmp)[0] if subprocesses
                              else _large_p_check(large_p, proj_dim))
    n = ours_info["feature_shape"][0]
    out["num_params"] = ours_info["num_params"]
    out["examples"] = n
    out["ours"] = ours_info
    out["ours_examples_per_s"] = ours_info["examples_per_s"]
    out["ours_peak_rss_mib"] = ours_info.get("peak_rss_mib", _rss_mib())
    if peer_info:
        out["peer"] = peer_info
        out["peer_examples_per_s"] = peer_info["examples_per_s"]
        out["peer_grad_only_examples_per_s"] = peer_info["grad_only_examples_per_s"]
        out["ratio"] = out["ours_examples_per_s"] / out["peer_examples_per_s"]
        out["ratio_vs_peer_grad_only"] = out["ours_examples_per_s"] / out["peer_grad_only_examples_per_s"]
        out["peer_peak_rss_mib"] = peer_info.get("peak_rss_mib", _rss_mib())
        out["check"] = _grad_check(ours_arr, peer_arr, check)
    else:
        out["peer_examples_per_s"] = out["ratio"] = None
    if projection:
        say("projection alone ...")
        out["projection"] = _projection_bench(out["num_params"], proj_dim, min(project_every, n), peer=False)
    if peer_info and projection:
        pj = out["projection"]
        pj["peer_trak_s"] = float(np.median(peer_info["projection_call_s"]))
        pj["peer_trak_rows"] = min(project_every, n)
        pj["ratio_sjlt_vs_peer"] = pj["peer_trak_s"] / pj["sjlt_s"]
        pj["ratio_chunked_vs_peer"] = pj["peer_trak_s"] / pj["chunked_s"]
    peak = max(peak, matmul_peak_gflops(matmul_n))
    out["matmul_peak_gflops"] = peak
    out["ours_fraction_of_matmul_peak"] = ours_info["gflops"] / ours_info["seconds"] / peak
    if peer_info:
        out["peer_grad_fraction_of_matmul_peak"] = peer_info["grad_gflops"] / peer_info["grad_s"] / peak
    out["goal_ratio"] = 5.0
    out["goal_met"] = None if out["ratio"] is None else bool(out["ratio"] >= 5.0)
    out["load_average_end"] = list(os.getloadavg())
    return out


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
    """The LoRA MLP case (``--model mlp`` / ``--quick``)."""
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
    if args.quick or args.model == "mlp":
        return _main_mlp(args)
    progress = None if args.json else (lambda m: print(m, flush=True))
    r = run_llama(args.model, domain=args.domain, examples=args.examples, seq_len=args.seq_len,
                  proj_dim=args.proj_dim or 8192, projector=args.projector, batch_size=args.batch_size,
                  bucket=args.bucket, repeats=args.repeats, peer=not args.no_peer,
                  large_p=args.large_p or None, progress=progress)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(_llama_summary(r))
    return 0


def _llama_summary(r: dict) -> str:
    o = r["ours"]
    lines = [f"{r['model']} LoRA ({r['num_params']} params) on {r['examples']} {r['domain']} examples, "
             f"seq {r['seq_len']} -> k={r['proj_dim']}, {r['device']}, {r['cpu_count']} CPUs, load "
             f"{r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}, matmul peak "
             f"{r['matmul_peak_gflops']:.1f} GFLOP/s",
             f"  ours: {r['ours_examples_per_s']:.3f} ex/s ({r['projector']}; chunks [rows, length] "
             f"{o['chunks']}, {100 * r['ours_fraction_of_matmul_peak']:.0f}% of peak), peak RSS "
             f"{r['ours_peak_rss_mib']:.0f} MiB"]
    if r.get("ratio"):
        p = r["peer"]
        c = r["check"]
        lines += [f"  peer: {r['peer_examples_per_s']:.3f} ex/s (gradients alone "
                  f"{r['peer_grad_only_examples_per_s']:.3f} ex/s at "
                  f"{100 * r['peer_grad_fraction_of_matmul_peak']:.0f}% of peak; TRAK projection "
                  f"{p['projection_s']:.1f} s), peak RSS {r['peer_peak_rss_mib']:.0f} MiB",
                  f"  ratio {r['ratio']:.2f}x (goal 5x: {'met' if r['goal_met'] else 'NOT met'}); "
                  f"vs the peer's gradients alone {r['ratio_vs_peer_grad_only']:.2f}x",
                  f"  check: gradient cosine {', '.join(f'{x:.6f}' for x in c['grad_cosine'])}, "
                  f"max |loss diff| {c['max_abs_loss_diff']:.1e} (mean loss {c['mean_loss_ours']:.4f} "
                  f"vs {c['mean_loss_peer']:.4f})"]
    pj = r.get("projection")
    if pj:
        lines.append(f"  projection [{pj['B']}, {pj['P']}] -> {pj['k']}: sjlt {pj['sjlt_s'] * 1e3:.1f} ms, "
                     f"chunked {pj['chunked_s'] * 1e3:.0f} ms, dense (scaled) {pj['dense_s_scaled'] * 1e3:.0f} ms"
                     + (f", torch TRAK-style {pj['peer_trak_s']:.1f} s" if "peer_trak_s" in pj else ""))
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
          + (f", torch TRAK-style {pj['peer_trak_s']*1e3:.1f} ms" if "peer_trak_s" in pj else ""))
    print(f"featurize ({res['num_params']} LoRA params -> {res['proj_dim']}): "
          f"ours {res['ours_examples_per_s']:.1f} ex/s"
          + (f", peer {res['peer_examples_per_s']:.1f} ex/s, ratio {res['ratio']:.2f}x"
             if res["ratio"] else ""))
    if "ours_fraction_of_matmul_peak" in res:
        print(f"ours at {100 * res['ours_fraction_of_matmul_peak']:.0f}% of the matmul peak")
    return 0
