"""``duet-jax bench finetune``: LoRA fine-tuning and evaluation examples/s of duet-jax's jitted
trainer against PyTorch + PEFT on the same weights, the same examples, same machine, same run.

Cases (each a dict with ``name``, ``ours_examples_per_s``, ``peer_examples_per_s``, ``ratio`` =
ours / peer, plus details):

1. ``full_lora``: LoRA r=8 on q,k,v,o of every layer, AdamW, one epoch over the same M real QA
   examples (``arc_easy`` train split). Ours: :func:`duet_jax.train.finetune` (the pool is padded
   to its longest row rounded up to 16, the LM head runs only on the answer slots). Peer: PEFT on
   transformers' ``LlamaForCausalLM`` built from our weights, the ordinary padded batches of
   ``batch x seq_len`` (8 x 128) with ``labels`` (-100 off the answer) and the full LM head,
   ``torch.optim.AdamW`` + global-norm clipping + warm-up/cosine, same steps.
2. ``frozen_trunk``: LoRA on the last 4 layers only. Ours computes the hidden states entering the
   first adapted layer once (:func:`~duet_jax.train.trunk_hidden`) and fine-tunes from them; the
   peer (PEFT on those same layers) runs the whole model each step. The trunk pass is reported
   apart (``trunk_s``) and folded in for ``ratio_with_trunk`` (one fine-tune paying the whole
   trunk; DUET pays it once per run, for about 60 fine-tunes).
3. ``k4_vmapped``: k = 4 adapters on 4 mixtures in one :func:`~duet_jax.train.finetune_many` call
   against 4 sequential :func:`~duet_jax.train.finetune` calls (both ours; frozen-trunk setting).
4. ``eval_loglik``: answer log-likelihood per example (:func:`~duet_jax.train.row_scores`, full
   model) against the PEFT model's forward with full logits + log-softmax + gather on padded
   batches; the largest per-example difference is reported as a check that both compute the same.
5. ``peak_rss``: peak resident memory (``ru_maxrss``) of a fine-tune at sequence 256, batch 8,
   full LoRA, in a fresh subprocess per side (model load included; ``after_load_mib`` apart).

Every timing is taken after a warm-up call (JAX compile time reported apart as ``compile_s``);
ours and the peer alternate rep by rep so that load from other processes hits both alike; the
median rep counts. FLOPs are counted per side from the shapes each side actually computes
(:func:`train_flops`) and reported as a fraction of this machine's float32 matmul peak
(a big jitted ``jnp`` matmul, measured at the start and the end of the run; the larger counts).
torch / peft come from the ``bench`` extra (``make bench-setup``) and are imported inside functions.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HELP = "LoRA fine-tune / evaluation examples/s vs PyTorch + PEFT on the same weights and examples"

__all__ = ["HELP", "add_arguments", "main", "run", "train_flops", "CASES"]

CASES = ("full_lora", "frozen_trunk", "k4_vmapped", "eval_loglik", "peak_rss")
ATTN = ("q", "k", "v", "o")


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC")
    parser.add_argument("--domain", default="arc_easy", help="built-in QA domain (train split)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 16 examples, sequence 64, 2 reps, 1 step in the RSS case")
    parser.add_argument("--examples", type=int, default=None, help="M (default 32; quick 16)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokenizer max_length and the peer's padded length (default 128; quick 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed reps per side (default 2)")
    parser.add_argument("--last-layers", type=int, default=4, help="LoRA layers of the frozen-trunk case")
    parser.add_argument("--k", type=int, default=4, help="adapters of the vmapped case")
    parser.add_argument("--rss-seq-len", type=int, default=256)
    parser.add_argument("--remat", action="store_true",
                        help="peak_rss case: per-layer activation checkpointing (TrainConfig.remat)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peer")
    parser.add_argument("--json", action="store_true", help="print the JSON list of cases")


# ------------------------------------------------------------------------------------ helpers
def _now() -> float:
    return time.perf_counter()


def _matmul_peak(n: int = 2048) -> float:
    from duet_jax.bench.influence import matmul_peak_gflops

    return float(matmul_peak_gflops(n))


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


def _examples(domain: str, n: int):
    from duet_jax.data import SplitSpec, get_domain

    train = get_domain(domain).splits(SplitSpec(validation=0.1, evaluation=0.2)).train
    if len(train) < n:
        reps = -(-n // len(train))
        train = (list(train) * reps)
    return list(train[:n])


class _Setup:
    """The model, its weights for the peer, the tokenized examples and the pool."""

    def __init__(self, model, tokenizer, examples, seq_len: int):
        from duet_jax.data import EncodeConfig, encode_examples
        from duet_jax.models import hf_state_dict
        from duet_jax.train import build_pool

        self.model = model
        self.cfg = model.config
        self.tok_split = encode_examples(examples, tokenizer,
                                         EncodeConfig(max_length=seq_len, buckets=(seq_len,)))
        self.pool, _ = build_pool(self.tok_split)
        self.weights = hf_state_dict(model)
        self.seq_len = seq_len
        t = self.tok_split
        self.real_token_fraction = float(t.lengths.sum() / (len(t) * seq_len))
        self.answer_fraction = float(t.loss_mask.sum() / (len(t) * seq_len))


def _with_lora(model, targets, last_layers, seed=1):
    """A copy of ``model``'s graph with adapters attached: (graphdef, lora, frozen, start)."""
    from flax import nnx

    from duet_jax.models import LoRAConfig, add_lora
    from duet_jax.train import split_model, trunk_start

    g, st = nnx.split(model)
    m = nnx.merge(g, st)  # a fresh module tree sharing the (immutable) weight arrays
    add_lora(m, LoRAConfig(rank=8, alpha=16, targets=targets, last_layers=last_layers),
             rngs=nnx.Rngs(seed))
    g2, lora, frozen = split_model(m)
    return g2, lora, frozen, trunk_start(m)


# ------------------------------------------------------------------------------------ the peer
def _peer_model(cfg, weights, last_layers):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    tm = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    sd = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise RuntimeError(f"peer weights did not load: missing {missing}, unexpected {unexpected}")
    tm.tie_weights()
    layers = None if last_layers is None else list(range(cfg.num_layers - last_layers, cfg.num_layers))
    lc = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                         target_modules=[f"{t}_proj" for t in ATTN], layers_to_transform=layers,
                         task_type="CAUSAL_LM")
    return peft.get_peft_model(tm, lc)


def _peer_tensors(tok_split, seq_len):
    import torch

    ids = torch.from_numpy(tok_split.input_ids[:, :seq_len].astype(np.int64))
    att = torch.from_numpy(tok_split.attention_mask[:, :seq_len].astype(np.int64))
    lm = torch.from_numpy(tok_split.loss_mask[:, :seq_len].astype(bool))
    labels = torch.where(lm, ids, torch.full_like(ids, -100))
    return ids, att, labels


class _PeerTrainer:
    """One epoch of PEFT fine-tuning on padded batches; the adapter is reset before each epoch."""

    def __init__(self, pm, tensors, batch, epochs_examples, lr=2e-4, warmup_ratio=0.1):
        import torch

        self.pm, self.t, self.batch = pm, tensors, batch
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.init = [p.detach().clone() for p in self.params]
        self.m = epochs_examples
        self.steps = -(-epochs_examples // batch)
        self.lr, self.warm = lr, int(round(warmup_ratio * self.steps))
        self.gen = torch.Generator().manual_seed(0)

    def epoch(self, max_steps: int | None = None) -> list[float]:
        import torch
        from transformers import get_cosine_schedule_with_warmup

        with torch.no_grad():
            for p, p0 in zip(self.params, self.init, strict=True):
                p.copy_(p0)
        self.pm.train()
        opt = torch.optim.AdamW(self.params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        sched = get_cosine_schedule_with_warmup(opt, self.warm, self.steps)
        ids, att, labels = self.t
        order = torch.randperm(self.m, generator=self.gen)
        order = order.repeat(-(-self.steps * self.batch // self.m))[: self.steps * self.batch]
        losses = []
        for s in range(self.steps if max_steps is None else min(max_steps, self.steps)):
            r = order[s * self.batch:(s + 1) * self.batch]
            out = self.pm(input_ids=ids[r], attention_mask=att[r], labels=labels[r])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        return losses


def _peer_eval(pm, tok_split, seq_len, batch):
    """Per example: (answer-token log-likelihood, summed loss-token NLL) from full logits."""
    import torch

    ids, att, _ = _peer_tensors(tok_split, seq_len)
    p0 = torch.from_numpy(tok_split.prompt_lengths.astype(np.int64))
    na = torch.from_numpy(tok_split.answer_lengths.astype(np.int64))
    lm = torch.from_numpy(tok_split.loss_mask[:, :seq_len].astype(np.float32))
    pos = torch.arange(seq_len)
    smask = ((pos[None] >= p0[:, None]) & (pos[None] < (p0 + na)[:, None])).float()
    ll, nll = [], []
    pm.eval()
    with torch.inference_mode():
        for b in range(0, ids.shape[0], batch):
            sl = slice(b, b + batch)
            logits = pm(input_ids=ids[sl], attention_mask=att[sl]).logits  # [B, T, V] full
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            tok_lp = torch.gather(lp, -1, ids[sl, 1:, None])[..., 0]  # predicts token t+1
            ll.append((tok_lp * smask[sl, 1:]).sum(1))
            nll.append(-(tok_lp * lm[sl, 1:]).sum(1))
    return torch.cat(ll).numpy(), torch.cat(nll).numpy()


# ------------------------------------------------------------------------------------ cases
def _case(name, ours_n, ours_s, peer_n=None, peer_s=None, **extra):
    c = {"name": name, "ours_examples_per_s": ours_n / ours_s if ours_s else None,
         "peer_examples_per_s": (peer_n / peer_s) if peer_s else None}
    c["ratio"] = (c["ours_examples_per_s"] / c["peer_examples_per_s"]
                  if c["ours_examples_per_s"] and c["peer_examples_per_s"] else None)
    c.update(ours_s=ours_s, peer_s=peer_s, **extra)
    return c


def _alternate(ours_fn, peer_fn, repeats):
    """Median seconds of each, reps interleaved (ours, peer, ours, peer, ...)."""
    to, tp = [], []
    for _ in range(repeats):
        t0 = _now()
        ours_fn()
        to.append(_now() - t0)
        if peer_fn is not None:
            t0 = _now()
            peer_fn()
            tp.append(_now() - t0)
    return float(np.median(to)), (float(np.median(tp)) if tp else None), to, tp


def _train_case(name, s: _Setup, *, last_layers, batch, repeats, peer, peak_fn, use_trunk):
    import jax

    from duet_jax.train import TrainConfig, finetune, trunk_hidden

    g, lora, frozen, start0 = _with_lora(s.model, ATTN, last_layers)
    cfg = s.cfg
    M = len(s.pool)
    tc = TrainConfig(epochs=1, batch_size=batch, learning_rate=2e-4)
    pool, start, trunk_s, trunk_compile_s = s.pool, 0, None, None
    if use_trunk:
        start = start0
        t0 = _now()
        trunk_hidden(g, lora, frozen, s.pool, start=start)  # compile (one program per length bucket)
        trunk_compile_s = _now() - t0
        t0 = _now()
        pool = s.pool.with_hidden(trunk_hidden(g, lora, frozen, s.pool, start=start))
        jax.block_until_ready(pool.hidden)
        trunk_s = _now() - t0
    idx = np.arange(M, dtype=np.int32)
    keys = iter(range(1000))
    t0 = _now()
    r = finetune(g, lora, frozen, pool, idx, jax.random.key(next(keys)), tc, start=start)
    compile_s = _now() - t0
    steps = int(r.losses.shape[0])
    ours_losses = []

    def ours():
        res = finetune(g, lora, frozen, pool, idx, jax.random.key(next(keys)), tc, start=start)
        ours_losses.append(float(np.mean(np.asarray(res.losses))))

    peer_fn, peer_info = None, {}
    if peer:
        pt = _PeerTrainer(_peer_model(cfg, s.weights, last_layers), _peer_tensors(s.tok_split, s.seq_len),
                          batch, M)
        peer_losses = []
        pt.epoch(max_steps=1)  # warm-up (one step)
        peer_fn = lambda: peer_losses.append(float(np.mean(pt.epoch())))
    ours_s, peer_s, to, tp = _alternate(ours, peer_fn, repeats)
    T, A = s.pool.length, s.pool.answer_slots
    n_layers_lora = cfg.num_layers if last_layers is None else last_layers
    first = cfg.num_layers - n_layers_lora
    ours_fl = train_flops(cfg, rows=steps * batch, seq=T, head_positions=steps * batch * A, start=start,
                          first_trained=first, lora_layers=n_layers_lora)
    peak = peak_fn()
    extra = dict(examples=M, steps=steps, batch=batch, ours_seq=T, ours_answer_slots=A,
                 start=start, compile_s=compile_s, ours_reps_s=to,
                 ours_mean_loss=float(np.mean(ours_losses)),
                 ours_gflops=ours_fl / 1e9, ours_fraction_of_matmul_peak=ours_fl / ours_s / 1e9 / peak)
    if peer:
        Tp = s.seq_len
        peer_fl = train_flops(cfg, rows=steps * batch, seq=Tp, head_positions=steps * batch * Tp,
                              first_trained=first, lora_layers=n_layers_lora)
        peer_info = dict(peer_seq=Tp, peer_reps_s=tp, peer_mean_loss=float(np.mean(peer_losses)),
                         peer_gflops=peer_fl / 1e9, peer_fraction_of_matmul_peak=peer_fl / peer_s / 1e9 / peak)
        extra.update(peer_info)
    if use_trunk:
        # the trunk pass forward-only through layers [0, start) on the pool's rows, at bucketed lengths
        extra.update(trunk_s=trunk_s, trunk_compile_s=trunk_compile_s,
                     ours_with_trunk_examples_per_s=M / (ours_s + trunk_s),
                     ratio_with_trunk=((M / (ours_s + trunk_s)) / (M / peer_s)) if peer_s else None)
    return _case(name, M, ours_s, M if peer else None, peer_s, **extra)


def _k_case(s: _Setup, *, last_layers, batch, repeats, k, peak_fn):
    import jax

    from duet_jax.train import TrainConfig, finetune, finetune_many, trunk_hidden

    g, lora, frozen, start = _with_lora(s.model, ATTN, last_layers)
    pool = s.pool.with_hidden(trunk_hidden(g, lora, frozen, s.pool, start=start))
    M = len(pool)
    tc = TrainConfig(epochs=1, batch_size=batch, learning_rate=2e-4)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, M, M) for _ in range(k)]).astype(np.int32)  # k mixtures of M
    c = iter(range(1, 10_000))

    def many():
        keys = jax.random.split(jax.random.key(next(c)), k)
        finetune_many(g, lora, frozen, pool, idx, keys, tc, start=start)

    def seq():
        keys = jax.random.split(jax.random.key(next(c)), k)
        for j in range(k):
            finetune(g, lora, frozen, pool, idx[j], keys[j], tc, start=start)

    t0 = _now()
    many()
    compile_many = _now() - t0
    t0 = _now()
    seq()
    compile_seq = _now() - t0
    many_s, seq_s, to, tp = _alternate(many, seq, repeats)
    return _case(f"k{k}_vmapped", k * M, many_s, k * M, seq_s, k=k, examples=M, start=start,
                 peer="4 sequential duet-jax finetune calls" if k == 4 else f"{k} sequential finetune calls",
                 compile_s=compile_many, peer_compile_s=compile_seq, ours_reps_s=to, peer_reps_s=tp)


def _eval_case(s: _Setup, *, batch, repeats, peer, peak_fn, last_layers=4):
    import jax

    from duet_jax.train import row_scores, trunk_hidden

    cfg = s.cfg
    g, lora, frozen, _ = _with_lora(s.model, ATTN, None)
    M = len(s.pool)
    t0 = _now()
    nll, cnt, ll = jax.block_until_ready(row_scores(g, lora, frozen, s.pool, batch_size=16))
    compile_s = _now() - t0
    ours = lambda: jax.block_until_ready(row_scores(g, lora, frozen, s.pool, batch_size=16))
    peer_fn, extra = None, {}
    if peer:
        pm = _peer_model(cfg, s.weights, None)
        p_ll, p_nll = _peer_eval(pm, s.tok_split, s.seq_len, batch)  # warm-up + check
        extra.update(max_abs_loglik_diff=float(np.abs(p_ll - np.asarray(ll)).max()),
                     max_abs_nll_diff=float(np.abs(p_nll - np.asarray(nll)).max()))
        peer_fn = lambda: _peer_eval(pm, s.tok_split, s.seq_len, batch)
    ours_s, peer_s, to, tp = _alternate(ours, peer_fn, repeats)
    T, K = s.pool.length, int(np.asarray(cnt).sum() + 0)
    flat = int(((np.asarray(s.pool.loss_mask) + np.asarray(s.pool.score_mask)) > 0).sum())
    heads = -(-flat // 256) * 256
    nb = -(-M // 16)
    peak = peak_fn()
    ours_fl = train_flops(cfg, rows=nb * 16, seq=T, head_positions=heads, first_trained=None,
                          lora_layers=cfg.num_layers)
    extra.update(examples=M, ours_seq=T, ours_head_positions=heads, compile_s=compile_s,
                 ours_reps_s=to, ours_gflops=ours_fl / 1e9,
                 ours_fraction_of_matmul_peak=ours_fl / ours_s / 1e9 / peak, loss_tokens=K)
    # the frozen-trunk variant DUET uses for its evaluation sets (trunk cached once per run)
    g4, lora4, frozen4, start = _with_lora(s.model, ATTN, last_layers)
    cached = s.pool.with_hidden(trunk_hidden(g4, lora4, frozen4, s.pool, start=start))
    f4 = lambda: jax.block_until_ready(row_scores(g4, lora4, frozen4, cached, start=start, batch_size=16))
    f4()
    t4 = float(np.median([(lambda t0: (f4(), _now() - t0)[1])(_now()) for _ in range(repeats)]))
    extra.update(ours_frozen_trunk_examples_per_s=M / t4, frozen_trunk_start=start)
    if peer:
        nbp = -(-M // batch)
        peer_fl = train_flops(cfg, rows=nbp * batch, seq=s.seq_len, head_positions=nbp * batch * s.seq_len,
                              first_trained=None, lora_layers=cfg.num_layers)
        extra.update(peer_seq=s.seq_len, peer_batch=batch, peer_reps_s=tp, peer_gflops=peer_fl / 1e9,
                     peer_fraction_of_matmul_peak=peer_fl / peer_s / 1e9 / peak)
    return _case("eval_loglik", M, ours_s, M if peer else None, peer_s, **extra)


# ------------------------------------------------------------------------------------ peak RSS
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


def _vm_hwm_mib() -> float:
    hwm = _proc_status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if hwm is None else hwm


def _vm_rss_mib() -> float | None:
    return _proc_status_mib("VmRSS")


def _rss_child(side: str, model_dir: str, ids_path: str, seq: int, batch: int, steps: int,
               remat: bool = False) -> None:
    """Run in a fresh interpreter: load, fine-tune ``steps`` steps at ``batch x seq``, print JSON.

    Ours records ``stages``: ``[name, VmRSS, VmHWM]`` in MiB after the imports, the model load, the
    pool, attaching the adapter, the ahead-of-time compile of the training program (which
    ``finetune`` then reuses: ``compiles`` counts the programs in ``finetune``'s jit cache) and the
    run; and the compiled program's own accounting (``compiled_*_mib``: arguments = the weights,
    temp = activations and workspace)."""
    arr = np.load(ids_path)
    out = {"side": side}
    if side == "ours":
        stages = []
        stage = lambda name: stages.append([name, _vm_rss_mib(), _vm_hwm_mib()])
        import jax

        from duet_jax.data.encode import TokenizedSplit
        from duet_jax.models import load_model
        from duet_jax.train import TrainConfig, build_pool, finetune, trainer

        stage("imports")
        model = load_model(model_dir)
        out["after_load_mib"] = _vm_hwm_mib()
        stage("load_model")
        t = TokenizedSplit(arr["input_ids"], arr["loss_mask"], arr["lengths"], arr["prompt_lengths"],
                           arr["answer_lengths"], tuple(str(i) for i in range(len(arr["lengths"]))),
                           (seq,), (), 0, int(arr["pad_id"]))
        pool, _ = build_pool(t, length=seq)
        stage("build_pool")
        g, lora, frozen, _ = _with_lora(model, ATTN, None)
        del model
        stage("add_lora")
        cfg = TrainConfig(steps=steps, batch_size=batch, remat=remat)
        out["remat"] = remat
        idx = jax.numpy.arange(len(pool), dtype=jax.numpy.int32)
        compiled = trainer._finetune_jit.lower(g, lora, frozen, pool, idx, jax.random.key(0), config=cfg,
                                               steps=steps, start=0).compile()
        out["after_compile_mib"] = _vm_hwm_mib()
        stage("compile")
        try:
            ma = compiled.memory_analysis()
            out["compiled_argument_mib"] = ma.argument_size_in_bytes / 2**20
            out["compiled_temp_mib"] = ma.temp_size_in_bytes / 2**20
            out["compiled_output_mib"] = ma.output_size_in_bytes / 2**20
        except Exception:  # not every backend reports it
            pass
        del compiled
        t0 = _now()
        r = finetune(g, lora, frozen, pool, np.arange(len(pool), dtype=np.int32), jax.random.key(0),
                     cfg, start=0)
        np.asarray(r.losses)
        out["seconds_incl_compile"] = _now() - t0
        stage("finetune")
        out["compiles"] = trainer._finetune_jit._cache_size()
        out["losses"] = np.asarray(r.losses).tolist()
        out["pool_seq"] = pool.length
        out["stages"] = stages
    else:
        import torch
        import transformers

        tm = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        out["after_load_mib"] = _vm_hwm_mib()
        import peft

        pm = peft.get_peft_model(tm, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[f"{x}_proj" for x in ATTN],
            task_type="CAUSAL_LM"))
        ids = torch.from_numpy(arr["input_ids"][:, :seq].astype(np.int64))
        att = (torch.arange(seq)[None] < torch.from_numpy(arr["lengths"].astype(np.int64))[:, None]).long()
        labels = torch.where(torch.from_numpy(arr["loss_mask"][:, :seq].astype(bool)), ids, -100)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4)
        t0 = _now()
        for s in range(steps):
            r = slice((s * batch) % len(ids), (s * batch) % len(ids) + batch)
            pm(input_ids=ids[r], attention_mask=att[r], labels=labels[r]).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        out["seconds_incl_compile"] = _now() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RSS_JSON " + json.dumps(out), flush=True)


def _rss_case(s_model, tokenizer, examples, *, seq, batch, steps, peer, remat=False):
    from duet_jax.data import EncodeConfig, encode_examples
    from duet_jax.models import save_hf

    t = encode_examples(examples, tokenizer, EncodeConfig(max_length=seq, buckets=(seq,)))
    res = {}
    with tempfile.TemporaryDirectory(prefix="duet-bench-ft-") as d:
        save_hf(s_model, os.path.join(d, "model"))
        ids_path = os.path.join(d, "ids.npz")
        np.savez(ids_path, input_ids=t.input_ids, loss_mask=t.loss_mask, lengths=t.lengths,
                 prompt_lengths=t.prompt_lengths, answer_lengths=t.answer_lengths, pad_id=t.pad_id)
        for side in (("ours", "peer") if peer else ("ours",)):
            code = (f"from duet_jax.bench.finetune import _rss_child; _rss_child({side!r}, "
                    f"{os.path.join(d, 'model')!r}, {ids_path!r}, {seq}, {batch}, {steps}, {remat!r})")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [x for x in p.stdout.splitlines() if x.startswith("RSS_JSON ")]
            if p.returncode != 0 or not line:
                res[side] = {"error": (p.stderr or p.stdout)[-2000:]}
            else:
                res[side] = json.loads(line[-1][len("RSS_JSON "):])
    o, pe = res.get("ours", {}), res.get("peer", {})
    n = steps * batch
    c = _case("peak_rss", n, o.get("seconds_incl_compile"), n if pe.get("seconds_incl_compile") else None,
              pe.get("seconds_incl_compile"), seq=seq, batch=batch, steps=steps,
              ours_peak_rss_mib=o.get("peak_rss_mib"), ours_after_load_mib=o.get("after_load_mib"),
              ours_after_compile_mib=o.get("after_compile_mib"), ours_stages=o.get("stages"),
              ours_compiled_temp_mib=o.get("compiled_temp_mib"),
              ours_compiled_argument_mib=o.get("compiled_argument_mib"),
              ours_compiles=o.get("compiles"), ours_losses=o.get("losses"),
              peer_peak_rss_mib=pe.get("peak_rss_mib"), peer_after_load_mib=pe.get("after_load_mib"),
              goal_mib=4096, ours_meets_goal=(o.get("peak_rss_mib") or 1e18) < 4096, remat=remat,
              note="examples/s here are steps x batch over the time of the timed call (ours: a "
                   "cached-compile call, peer: the first steps); memory is the point of this case")
    for side in ("ours", "peer"):
        if "error" in res.get(side, {}):
            c[f"{side}_error"] = res[side]["error"]
    return c


# ------------------------------------------------------------------------------------ run
def run(model_spec: str = "smollm2-135m-instruct", *, domain: str = "arc_easy", quick: bool = False,
        examples: int | None = None, seq_len: int | None = None, batch: int = 8,
        repeats: int | None = None, last_layers: int = 4, k: int = 4, rss_seq_len: int = 256,
        cases=CASES, peer: bool = True, matmul_n: int = 2048, model=None, tokenizer=None, example_list=None,
        progress=None, remat: bool = False) -> dict:
    """Run the cases; returns ``{"cases": [...], ...settings}``. ``model`` / ``tokenizer`` /
    ``example_list`` override the spec (tests pass a tiny random model)."""
    import jax

    say = progress or (lambda msg: None)
    n = examples or (16 if quick else 32)
    seq = seq_len or (64 if quick else 128)
    reps = repeats or 2
    cases = tuple(cases)
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise ValueError(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    if peer:
        try:
            import peft  # noqa: F401
            import torch
            import transformers  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"the peer needs torch + peft + transformers ({e}); install the bench "
                             "extra (make bench-setup) or pass --no-peer") from e
    t0 = _now()
    if model is None:
        from duet_jax.models import load_model
        model = load_model(model_spec, dtype="float32")
    if tokenizer is None:
        from duet_jax.data import load_tokenizer
        tokenizer = load_tokenizer(model_spec)
    exs = example_list if example_list is not None else _examples(domain, n)
    load_s = _now() - t0
    s = _Setup(model, tokenizer, exs, seq)
    say(f"setup: {len(s.pool)} examples, pool {len(s.pool)} x {s.pool.length} "
        f"(answer slots {s.pool.answer_slots}); {100 * s.real_token_fraction:.0f}% of the peer's "
        f"{seq}-token positions are real tokens, {100 * s.answer_fraction:.1f}% carry loss")
    peaks = [_matmul_peak(matmul_n)]
    say(f"matmul peak {peaks[0]:.1f} GFLOP/s")
    peak_fn = lambda: max(peaks)
    out = []
    ll = min(last_layers, model.config.num_layers - 1)
    for name in cases:
        t1 = _now()
        if name == "full_lora":
            c = _train_case(name, s, last_layers=None, batch=batch, repeats=reps, peer=peer,
                            peak_fn=peak_fn, use_trunk=False)
        elif name == "frozen_trunk":
            c = _train_case(name, s, last_layers=ll, batch=batch, repeats=reps, peer=peer,
                            peak_fn=peak_fn, use_trunk=True)
        elif name == "k4_vmapped":
            c = _k_case(s, last_layers=ll, batch=batch, repeats=reps, k=k, peak_fn=peak_fn)
        elif name == "eval_loglik":
            c = _eval_case(s, batch=batch, repeats=reps, peer=peer, peak_fn=peak_fn, last_layers=ll)
        else:
            c = _rss_case(model, tokenizer, exs, seq=rss_seq_len, batch=batch,
                          steps=1 if quick else 2, peer=peer, remat=remat)
        c["case_wall_s"] = _now() - t1
        out.append(c)
        say(_line(c))
    peaks.append(_matmul_peak(matmul_n))
    peak = max(peaks)
    for c in out:  # re-express every fraction against the final (largest) peak
        for side in ("ours", "peer"):
            gf, sec = c.get(f"{side}_gflops"), c.get(f"{side}_s")
            if gf and sec:
                c[f"{side}_fraction_of_matmul_peak"] = gf / sec / peak
    info = {"model": model_spec if example_list is None else "custom", "domain": domain,
            "examples": len(s.pool), "seq_len": seq, "batch": batch, "repeats": reps, "quick": quick,
            "matmul_peak_gflops": peak, "matmul_peak_samples_gflops": peaks,
            "real_token_fraction": s.real_token_fraction, "loss_token_fraction": s.answer_fraction,
            "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "load_s": load_s}
    if peer:
        import peft
        import torch
        import transformers
        info["peer"] = (f"transformers {transformers.__version__} / peft {peft.__version__} / "
                        f"torch {torch.__version__}")
        info["torch_threads"] = torch.get_num_threads()
    return {"cases": out, **info}


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _line(c) -> str:
    s = (f"{c['name']:<13} ours {_fmt(c['ours_examples_per_s'], '8.2f')} ex/s   peer "
         f"{_fmt(c['peer_examples_per_s'], '8.2f')} ex/s   ratio {_fmt(c['ratio'])}x")
    if "ours_fraction_of_matmul_peak" in c:
        s += f"   ours {100 * c['ours_fraction_of_matmul_peak']:.0f}% of peak"
    if c.get("peer_fraction_of_matmul_peak") is not None:
        s += f", peer {100 * c['peer_fraction_of_matmul_peak']:.0f}%"
    if c.get("ratio_with_trunk") is not None:
        s += f"   (with the trunk pass: {c['ratio_with_trunk']:.2f}x, trunk {c['trunk_s']:.1f} s)"
    if c["name"] == "peak_rss":
        s += (f"   peak RSS ours {_fmt(c.get('ours_peak_rss_mib'), '.0f')} MiB, peer "
              f"{_fmt(c.get('peer_peak_rss_mib'), '.0f')} MiB (goal < 4096)")
    if "max_abs_loglik_diff" in c:
        s += f"   max |loglik diff| {c['max_abs_loglik_diff']:.1e}"
    return s


def main(args) -> int:
    progress = None if args.json else (lambda m: print(m, flush=True))
    r = run(args.model, domain=args.domain, quick=args.quick, examples=args.examples,
            seq_len=args.seq_len, batch=args.batch, repeats=args.repeats,
            last_layers=args.last_layers, k=args.k, rss_seq_len=args.rss_seq_len,
            cases=[c.strip() for c in args.cases.split(",") if c.strip()], peer=not args.no_peer,
            progress=progress, remat=args.remat)
    if args.json:
        info = {k: v for k, v in r.items() if k != "cases"}
        print(json.dumps([{**c, "run": info} for c in r["cases"]]))
        return 0
    print(f"{r['model']} on {r['domain']}: {r['examples']} examples, peer batches {r['batch']} x "
          f"{r['seq_len']}, {r['device']}, {r['cpu_count']} CPUs, matmul peak "
          f"{r['matmul_peak_gflops']:.1f} GFLOP/s; {r.get('peer', 'no peer')}")
    for c in r["cases"]:
        print("  " + _line(c))
    return 0
