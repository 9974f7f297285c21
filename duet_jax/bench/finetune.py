"""``duet-jax bench finetune``: LoRA fine-tuning and evaluation examples/s of duet-jax's jitted
trainer against PyTorch + PEFT on the same weights, the same examples, same machine, same run.

Every case is a comparison (:func:`duet_jax.bench.common.compare`): ``ours``, ``peers`` (each with
``examples_per_s`` and ``fraction_of_matmul_peak``), ``strongest_peer`` (the fastest peer) and
``ratio_vs_strongest`` (ours / it); ``peer_examples_per_s`` / ``ratio`` keep their earlier meaning
(the ``peft_fixed`` peer). The PEFT peers, on transformers' ``LlamaForCausalLM`` built from our
weights, with ``labels`` = -100 off the answer:

- ``peft_fixed``: every batch padded to ``seq_len`` (8 x 128), batches in random order;
- ``peft_dynamic``: each batch padded to its own longest row, batches grouped by length with
  transformers' own ``get_length_grouped_indices`` (what ``Trainer(group_by_length=True)`` and a
  padding-to-longest collator do): the strongest ordinary HF setting.

Cases:

1. ``full_lora``: LoRA r=8 on q,k,v,o of every layer, AdamW, one epoch over the same M real QA
   examples (``arc_easy`` train split). Ours: :func:`duet_jax.train.finetune` (the
   ``_finetune_one`` the run's local program vmaps; the pool padded to its longest row rounded up
   to 16, the LM head only on the answer slots). Peers: ``torch.optim.AdamW`` + global-norm
   clipping + warm-up/cosine, same steps, full LM head.
2. ``frozen_trunk``: LoRA on the last 4 layers only. Ours computes the hidden states entering the
   first adapted layer once (:func:`~duet_jax.train.trunk_hidden`) and fine-tunes from them; the
   peers (PEFT on those same layers) run the whole model each step. The trunk pass is reported
   apart (``trunk_s``) and folded in for ``ratio_with_trunk`` (against the strongest peer).
3. ``k4_vmapped``: k = 4 adapters in the run's own program (:func:`duet_jax.loop.local_step.local_program`:
   sampling and k vmapped fine-tunes in one jit, scoring off) against 4 sequential
   :func:`~duet_jax.train.finetune` calls (both ours; frozen-trunk setting).
4. ``eval_loglik``: answer log-likelihood per example (:func:`~duet_jax.train.row_scores`, what the
   run's task feedback calls; full model) against the PEFT model's forward with full logits +
   log-softmax + gather, fixed and dynamic padding (rows sorted by length); the largest
   per-example difference is reported per peer as a check that all compute the same.
5. ``peak_rss``: peak resident memory of a fine-tune at sequence 256, batch 8, full LoRA, in a
   fresh subprocess per side (model load included; ``after_load_mib`` apart), the PEFT peer with
   fixed and with dynamic padding.

Every timing is taken after a warm-up call (JAX compile time reported apart as ``compile_s``);
all sides alternate rep by rep so that load from other processes hits them alike; the median rep
counts. FLOPs are counted per side from the shapes each side actually computes
(:func:`~duet_jax.bench.common.train_flops`) and reported as a fraction of this machine's float32
matmul peak (a big jitted ``jnp`` matmul at the start and the end of the run, and ``torch.mm``;
the largest counts). torch / peft come from the ``bench`` extra (``make bench-setup``) and are
imported inside functions.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from duet_jax.bench.common import (
    ATTN,
    MatmulPeak,
    alternate,
    bench_examples,
    compare,
    emit,
    load_average,
    machine_info,
    now,
    peak_rss_mib,
    peer_model,
    peer_tensors,
    peer_versions,
    require_peer,
    rss_mib,
    run_child,
    side,
    torch_matmul_peak_gflops,
    train_flops,
    with_lora,
)

HELP = "LoRA fine-tune / evaluation examples/s vs PyTorch + PEFT (fixed and dynamic padding)"

__all__ = ["HELP", "add_arguments", "main", "run", "train_flops", "CASES", "PEERS"]

CASES = ("full_lora", "frozen_trunk", "k4_vmapped", "eval_loglik", "peak_rss")
#: the PEFT peers: name -> (padding, group_by_length)
PEERS = {"peft_fixed": ("fixed", False), "peft_dynamic": ("dynamic", True)}


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC")
    parser.add_argument("--domain", default="arc_easy", help="built-in QA domain (train split)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 16 examples, sequence 64, 2 reps, 1 step in the RSS case")
    parser.add_argument("--examples", type=int, default=None, help="M (default 32; quick 16)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokenizer max_length and the fixed peer's padded length (default 128; quick 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed reps per side (default 2)")
    parser.add_argument("--last-layers", type=int, default=4, help="LoRA layers of the frozen-trunk case")
    parser.add_argument("--k", type=int, default=4, help="adapters of the vmapped case")
    parser.add_argument("--rss-seq-len", type=int, default=256)
    parser.add_argument("--remat", action="store_true",
                        help="peak_rss case: per-layer activation checkpointing (TrainConfig.remat)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peers")
    parser.add_argument("--json", action="store_true", help="print the JSON list of cases")


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
        self.lengths = np.minimum(t.lengths, seq_len).astype(np.int64)
        self.real_token_fraction = float(t.lengths.sum() / (len(t) * seq_len))
        self.answer_fraction = float(t.loss_mask.sum() / (len(t) * seq_len))


# ------------------------------------------------------------------------------------ the peers
class _PeerTrainer:
    """One epoch of PEFT fine-tuning; the adapter is reset before each epoch to its value when
    the trainer was built (build every trainer of a shared model before any of them trains).

    ``padding="fixed"``: every batch is ``batch x seq_len``; ``"dynamic"``: each batch is cut to its
    own longest row (the rows are right-padded, so this is padding to the longest). With
    ``group_by_length`` the epoch's order is transformers' ``get_length_grouped_indices`` (what
    ``Trainer(group_by_length=True)`` samples), else a random permutation. ``order`` fixes the
    rows of every step instead (tests: two paddings on the same batches)."""

    def __init__(self, pm, tensors, lengths, batch, epochs_examples, *, padding="fixed",
                 group_by_length=False, lr=2e-4, warmup_ratio=0.1, order=None):
        import torch

        if padding not in ("fixed", "dynamic"):
            raise ValueError(f"padding must be fixed or dynamic, got {padding!r}")
        self.pm, self.t, self.batch = pm, tensors, batch
        self.lengths = [int(x) for x in lengths]
        self.padding, self.group = padding, group_by_length
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.init = [p.detach().clone() for p in self.params]
        self.m = epochs_examples
        self.steps = -(-epochs_examples // batch)
        self.lr, self.warm = lr, int(round(warmup_ratio * self.steps))
        self.gen = torch.Generator().manual_seed(0)
        self.fixed_order = order
        self.batch_lengths: list[int] = []

    def _order(self):
        import torch

        if self.fixed_order is not None:
            return torch.as_tensor(self.fixed_order)
        n = self.steps * self.batch
        parts, have = [], 0
        while have < n:
            if self.group:
                from transformers.trainer_pt_utils import get_length_grouped_indices

                parts.append(torch.as_tensor(get_length_grouped_indices(self.lengths[: self.m], self.batch,
                                                                        generator=self.gen)))
            else:
                parts.append(torch.randperm(self.m, generator=self.gen))
            have += self.m
        return torch.cat(parts)[:n]

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
        order = self._order()
        losses, self.batch_lengths = [], []
        for s in range(self.steps if max_steps is None else min(max_steps, self.steps)):
            r = order[s * self.batch:(s + 1) * self.batch]
            T = max(self.lengths[int(i)] for i in r) if self.padding == "dynamic" else ids.shape[1]
            self.batch_lengths.append(int(T))
            out = self.pm(input_ids=ids[r, :T], attention_mask=att[r, :T], labels=labels[r, :T])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        return losses


def _peer_eval(pm, tok_split, seq_len, batch, padding="fixed"):
    """Per example: ``(answer-token log-likelihood, summed loss-token NLL, batch lengths)`` from
    full logits. ``padding="dynamic"``: rows sorted by length, each batch cut to its longest."""
    import torch

    ids, att, _ = peer_tensors(tok_split, seq_len)
    n = ids.shape[0]
    lengths = np.minimum(tok_split.lengths, seq_len).astype(np.int64)
    p0 = torch.from_numpy(tok_split.prompt_lengths.astype(np.int64))
    na = torch.from_numpy(tok_split.answer_lengths.astype(np.int64))
    lm = torch.from_numpy(tok_split.loss_mask[:, :seq_len].astype(np.float32))
    pos = torch.arange(seq_len)
    smask = ((pos[None] >= p0[:, None]) & (pos[None] < (p0 + na)[:, None])).float()
    order = np.argsort(lengths, kind="stable") if padding == "dynamic" else np.arange(n)
    ll, nll = np.zeros(n, np.float32), np.zeros(n, np.float32)
    blens = []
    pm.eval()
    with torch.inference_mode():
        for b in range(0, n, batch):
            r = torch.from_numpy(order[b:b + batch])
            T = int(lengths[order[b:b + batch]].max()) if padding == "dynamic" else seq_len
            blens.append(T)
            logits = pm(input_ids=ids[r, :T], attention_mask=att[r, :T]).logits  # [B, T, V] full
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            tok_lp = torch.gather(lp, -1, ids[r, 1:T, None])[..., 0]  # predicts token t+1
            ll[r.numpy()] = (tok_lp * smask[r, 1:T]).sum(1).numpy()
            nll[r.numpy()] = (-(tok_lp * lm[r, 1:T]).sum(1)).numpy()
    return ll, nll, blens


# ------------------------------------------------------------------------------------ cases
def _legacy(c: dict, peer: str = "peft_fixed") -> dict:
    """The earlier single-peer fields (``peer_examples_per_s``, ``ratio``, ``ours_s``, ``peer_s``,
    ``*_fraction_of_matmul_peak``) beside the comparison, ``peer`` being the earlier peer."""
    p = c["peers"].get(peer)
    c["peer_examples_per_s"] = p["examples_per_s"] if p else None
    c["ratio"] = c["ratios"].get(peer)
    c["ours_s"] = c["ours"]["seconds"]
    c["peer_s"] = p["seconds"] if p else None
    if p and p.get("fraction_of_matmul_peak") is not None:
        c["peer_fraction_of_matmul_peak"] = p["fraction_of_matmul_peak"]
    return c


def _finish(raw: dict, peak: float) -> dict:
    """A case from its sides, against ``peak`` (re-run at the end with the run's final peak)."""
    c = compare(raw["name"], raw["ours"], raw["peers"], peak, **raw["extra"])
    c = _legacy(c, raw.get("legacy", "peft_fixed"))
    if raw.get("trunk_s") is not None:  # frozen trunk: one fine-tune paying the whole trunk pass
        M = raw["extra"]["examples"]
        with_trunk = M / (c["ours"]["seconds"] + raw["trunk_s"])
        best = c["strongest_peer_examples_per_s"]
        c.update(ours_with_trunk_examples_per_s=with_trunk,
                 ratio_with_trunk=(with_trunk / best) if best else None,
                 ratio_with_trunk_vs_peft_fixed=(with_trunk / c["peer_examples_per_s"])
                 if c["peer_examples_per_s"] else None)
    return c


def _train_case(name, s: _Setup, *, last_layers, batch, repeats, peers, use_trunk) -> dict:
    import jax

    from duet_jax.train import TrainConfig, finetune, trunk_hidden

    g, lora, frozen, start0 = with_lora(s.model, ATTN, last_layers)
    cfg = s.cfg
    M = len(s.pool)
    tc = TrainConfig(epochs=1, batch_size=batch, learning_rate=2e-4)
    pool, start, trunk_s, trunk_compile_s = s.pool, 0, None, None
    if use_trunk:
        start = start0
        t0 = now()
        trunk_hidden(g, lora, frozen, s.pool, start=start)  # compile (one program per length bucket)
        trunk_compile_s = now() - t0
        t0 = now()
        pool = s.pool.with_hidden(trunk_hidden(g, lora, frozen, s.pool, start=start))
        jax.block_until_ready(pool.hidden)
        trunk_s = now() - t0
    idx = np.arange(M, dtype=np.int32)
    keys = iter(range(1000))
    t0 = now()
    r = finetune(g, lora, frozen, pool, idx, jax.random.key(next(keys)), tc, start=start)
    compile_s = now() - t0
    steps = int(r.losses.shape[0])
    ours_losses = []

    def ours():
        res = finetune(g, lora, frozen, pool, idx, jax.random.key(next(keys)), tc, start=start)
        ours_losses.append(float(np.mean(np.asarray(res.losses))))

    fns, trainers, peer_losses = {"ours": ours}, {}, {}
    if peers:
        pm = peer_model(cfg, s.weights, last_layers)
        tensors = peer_tensors(s.tok_split, s.seq_len)
        for pname in peers:  # all built before any trains: each keeps the same initial adapter
            padding, group = PEERS[pname]
            trainers[pname] = _PeerTrainer(pm, tensors, s.lengths, batch, M, padding=padding, group_by_length=group)
        for pname, pt in trainers.items():
            pt.epoch(max_steps=1)  # warm-up (one step)
            peer_losses[pname] = []
            fns[pname] = lambda pt=pt, out=peer_losses[pname]: out.append(float(np.mean(pt.epoch())))
    times = alternate(fns, repeats)
    T, A = s.pool.length, s.pool.answer_slots
    n_layers_lora = cfg.num_layers if last_layers is None else last_layers
    first = cfg.num_layers - n_layers_lora
    ours_fl = train_flops(cfg, rows=steps * batch, seq=T, head_positions=steps * batch * A, start=start,
                          first_trained=first, lora_layers=n_layers_lora)
    ours_s, ours_reps = times["ours"]
    ours_side = side(M / ours_s, seconds=ours_s, gflops=ours_fl / 1e9, reps_s=ours_reps, seq=T,
                     answer_slots=A, mean_loss=float(np.mean(ours_losses)), compile_s=compile_s,
                     what="duet_jax.train.finetune" + (" from the cached trunk" if use_trunk else ""))
    psides = {}
    for pname, pt in trainers.items():
        ps, preps = times[pname]
        lens = pt.batch_lengths  # the last epoch's padded lengths, one per step
        fl = sum(train_flops(cfg, rows=batch, seq=L, head_positions=batch * L, first_trained=first,
                             lora_layers=n_layers_lora) for L in lens)
        psides[pname] = side(M / ps, seconds=ps, gflops=fl / 1e9, reps_s=preps, batch_lengths=lens,
                             mean_loss=float(np.mean(peer_losses[pname])),
                             what=f"PEFT, {PEERS[pname][0]} padding"
                                  + (", length-grouped batches" if PEERS[pname][1] else ""))
    extra = dict(examples=M, steps=steps, batch=batch, start=start, compile_s=compile_s,
                 ours_mean_loss=float(np.mean(ours_losses)), ours_seq=T, ours_answer_slots=A,
                 ours_gflops=ours_fl / 1e9, ours_reps_s=ours_reps)
    for pname, ps in psides.items():
        extra[f"{pname}_mean_loss"] = ps["mean_loss"]
    if "peft_fixed" in psides:
        extra.update(peer_seq=s.seq_len, peer_mean_loss=psides["peft_fixed"]["mean_loss"],
                     peer_reps_s=psides["peft_fixed"]["reps_s"], peer_gflops=psides["peft_fixed"]["gflops"])
    if use_trunk:
        extra.update(trunk_s=trunk_s, trunk_compile_s=trunk_compile_s)
    return {"name": name, "ours": ours_side, "peers": psides, "extra": extra, "trunk_s": trunk_s}


def _k_case(s: _Setup, *, last_layers, batch, repeats, k) -> dict:
    """The run's program (``local_program``: k mixtures sampled and k fine-tunes vmapped in one
    jit, scoring off) against k sequential ``finetune`` calls on mixtures of the same size."""
    import jax
    import jax.numpy as jnp

    from duet_jax.loop.local_step import local_program
    from duet_jax.train import TrainConfig, finetune, num_steps, trunk_hidden

    g, lora, frozen, start = with_lora(s.model, ATTN, last_layers)
    pool = s.pool.with_hidden(trunk_hidden(g, lora, frozen, s.pool, start=start))
    M = len(pool)
    tc = TrainConfig(epochs=1, batch_size=batch, learning_rate=2e-4)
    steps = num_steps(tc, M)
    weights, domain_of = jnp.ones((M,), jnp.float32), jnp.zeros((M,), jnp.int32)
    counts = jnp.asarray([M], jnp.int32)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, M, M) for _ in range(k)]).astype(np.int32)  # k mixtures of M
    c = iter(range(1, 10_000))

    def run_program():
        out = local_program(g, lora, frozen, pool, weights, domain_of, counts, jax.random.key(next(c)), None,
                            train_config=tc, steps=steps, start=int(start), k=k, budget=M, n_domains=1,
                            replace=True, score=False)
        jax.block_until_ready(out[2].losses)

    def seq():
        keys = jax.random.split(jax.random.key(next(c)), k)
        for j in range(k):
            jax.block_until_ready(finetune(g, lora, frozen, pool, idx[j], keys[j], tc, start=start).losses)

    t0 = now()
    run_program()
    compile_many = now() - t0
    t0 = now()
    seq()
    compile_seq = now() - t0
    times = alternate({"ours": run_program, "seq": seq}, repeats)
    cfg = s.cfg
    fl = k * train_flops(cfg, rows=steps * batch, seq=pool.length, head_positions=steps * batch * pool.answer_slots,
                         start=start, first_trained=start, lora_layers=last_layers) / 1e9
    (ms, mreps), (ss, sreps) = times["ours"], times["seq"]
    name = f"sequential_{k}_finetune"
    return {"name": f"k{k}_vmapped", "legacy": name,
            "ours": side(k * M / ms, seconds=ms, gflops=fl, reps_s=mreps, compile_s=compile_many,
                         what=f"local_program: {k} mixtures sampled + {k} vmapped fine-tunes in one jit"),
            "peers": {name: side(k * M / ss, seconds=ss, gflops=fl, reps_s=sreps, compile_s=compile_seq,
                                 what=f"{k} sequential duet_jax.train.finetune calls (ours)")},
            "extra": dict(k=k, examples=M, start=start, compile_s=compile_many, peer_compile_s=compile_seq,
                          ours_reps_s=mreps, peer_reps_s=sreps,
                          peer=f"{k} sequential duet-jax finetune calls")}


def _eval_case(s: _Setup, *, batch, repeats, peers, last_layers=4) -> dict:
    import jax

    from duet_jax.train import row_scores, trunk_hidden

    cfg = s.cfg
    g, lora, frozen, _ = with_lora(s.model, ATTN, None)
    M = len(s.pool)
    t0 = now()
    nll, cnt, ll = jax.block_until_ready(row_scores(g, lora, frozen, s.pool, batch_size=16))
    compile_s = now() - t0
    fns = {"ours": lambda: jax.block_until_ready(row_scores(g, lora, frozen, s.pool, batch_size=16))}
    extra, blens = {}, {}
    if peers:
        pm = peer_model(cfg, s.weights, None)
        for pname in peers:
            padding = PEERS[pname][0]
            p_ll, p_nll, blens[pname] = _peer_eval(pm, s.tok_split, s.seq_len, batch, padding)  # warm-up + check
            extra[f"{pname}_max_abs_loglik_diff"] = float(np.abs(p_ll - np.asarray(ll)).max())
            extra[f"{pname}_max_abs_nll_diff"] = float(np.abs(p_nll - np.asarray(nll)).max())
            fns[pname] = lambda padding=padding: _peer_eval(pm, s.tok_split, s.seq_len, batch, padding)
        if "peft_fixed" in peers:
            extra.update(max_abs_loglik_diff=extra["peft_fixed_max_abs_loglik_diff"],
                         max_abs_nll_diff=extra["peft_fixed_max_abs_nll_diff"])
    times = alternate(fns, repeats)
    T, K = s.pool.length, int(np.asarray(cnt).sum() + 0)
    flat = int(((np.asarray(s.pool.loss_mask) + np.asarray(s.pool.score_mask)) > 0).sum())
    heads = -(-flat // 256) * 256
    nb = -(-M // 16)
    ours_fl = train_flops(cfg, rows=nb * 16, seq=T, head_positions=heads, first_trained=None,
                          lora_layers=cfg.num_layers)
    ours_s, oreps = times["ours"]
    psides = {}
    for pname in peers:
        ps, preps = times[pname]
        fl = sum(train_flops(cfg, rows=batch, seq=L, head_positions=batch * L, first_trained=None,
                             lora_layers=cfg.num_layers) for L in blens[pname])
        psides[pname] = side(M / ps, seconds=ps, gflops=fl / 1e9, reps_s=preps, batch_lengths=blens[pname],
                             what=f"PEFT forward, full logits, {PEERS[pname][0]} padding")
    # the frozen-trunk variant DUET uses for its evaluation sets (trunk cached once per run)
    g4, lora4, frozen4, start = with_lora(s.model, ATTN, last_layers)
    cached = s.pool.with_hidden(trunk_hidden(g4, lora4, frozen4, s.pool, start=start))
    f4 = lambda: jax.block_until_ready(row_scores(g4, lora4, frozen4, cached, start=start, batch_size=16))
    f4()
    t4, _ = alternate({"f4": f4}, repeats)["f4"]
    extra.update(examples=M, ours_seq=T, ours_head_positions=heads, compile_s=compile_s, ours_reps_s=oreps,
                 ours_gflops=ours_fl / 1e9, loss_tokens=K, ours_frozen_trunk_examples_per_s=M / t4,
                 frozen_trunk_start=start)
    if "peft_fixed" in psides:
        extra.update(peer_seq=s.seq_len, peer_batch=batch, peer_reps_s=psides["peft_fixed"]["reps_s"],
                     peer_gflops=psides["peft_fixed"]["gflops"])
    return {"name": "eval_loglik", "ours": side(M / ours_s, seconds=ours_s, gflops=ours_fl / 1e9, reps_s=oreps,
                                                 what="duet_jax.train.row_scores (full model)"),
            "peers": psides, "extra": extra}


# ------------------------------------------------------------------------------------ peak RSS
def _rss_child(side_: str, model_dir: str, ids_path: str, seq: int, batch: int, steps: int,
               remat: bool = False) -> None:
    """Run in a fresh interpreter: load, fine-tune ``steps`` steps at ``batch x seq``, print JSON.

    ``side_``: ``ours`` or a :data:`PEERS` name. Ours records ``stages``: ``[name, VmRSS, VmHWM]``
    in MiB after the imports, the model load, the pool, attaching the adapter, the ahead-of-time
    compile of the training program (which ``finetune`` then reuses: ``compiles`` counts the
    programs in ``finetune``'s jit cache) and the run; and the compiled program's own accounting
    (``compiled_*_mib``: arguments = the weights, temp = activations and workspace)."""
    arr = np.load(ids_path)
    out = {"side": side_}
    if side_ == "ours":
        stages = []
        stage = lambda name: stages.append([name, rss_mib(), peak_rss_mib()])
        import jax

        from duet_jax.data.encode import TokenizedSplit
        from duet_jax.models import load_model
        from duet_jax.train import TrainConfig, build_pool, finetune, trainer

        stage("imports")
        model = load_model(model_dir)
        out["after_load_mib"] = peak_rss_mib()
        stage("load_model")
        t = TokenizedSplit(arr["input_ids"], arr["loss_mask"], arr["lengths"], arr["prompt_lengths"],
                           arr["answer_lengths"], tuple(str(i) for i in range(len(arr["lengths"]))),
                           (seq,), (), 0, int(arr["pad_id"]))
        pool, _ = build_pool(t, length=seq)
        stage("build_pool")
        g, lora, frozen, _ = with_lora(model, ATTN, None)
        del model
        stage("add_lora")
        cfg = TrainConfig(steps=steps, batch_size=batch, remat=remat)
        out["remat"] = remat
        idx = jax.numpy.arange(len(pool), dtype=jax.numpy.int32)
        compiled = trainer._finetune_jit.lower(g, lora, frozen, pool, idx, jax.random.key(0), config=cfg,
                                               steps=steps, start=0).compile()
        out["after_compile_mib"] = peak_rss_mib()
        stage("compile")
        try:
            ma = compiled.memory_analysis()
            out["compiled_argument_mib"] = ma.argument_size_in_bytes / 2**20
            out["compiled_temp_mib"] = ma.temp_size_in_bytes / 2**20
            out["compiled_output_mib"] = ma.output_size_in_bytes / 2**20
        except Exception:  # not every backend reports it
            pass
        del compiled
        t0 = now()
        r = finetune(g, lora, frozen, pool, np.arange(len(pool), dtype=np.int32), jax.random.key(0),
                     cfg, start=0)
        np.asarray(r.losses)
        out["seconds_incl_compile"] = now() - t0
        stage("finetune")
        out["compiles"] = trainer._finetune_jit._cache_size()
        out["losses"] = np.asarray(r.losses).tolist()
        out["pool_seq"] = pool.length
        out["stages"] = stages
    else:
        import peft
        import torch
        import transformers

        tm = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        out["after_load_mib"] = peak_rss_mib()
        pm = peft.get_peft_model(tm, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[f"{x}_proj" for x in ATTN],
            task_type="CAUSAL_LM"))
        ids = torch.from_numpy(arr["input_ids"][:, :seq].astype(np.int64))
        lengths = np.minimum(arr["lengths"], seq).astype(np.int64)
        att = (torch.arange(seq)[None] < torch.from_numpy(lengths)[:, None]).long()
        labels = torch.where(torch.from_numpy(arr["loss_mask"][:, :seq].astype(bool)), ids, -100)
        padding, group = PEERS[side_]
        pt = _PeerTrainer(pm, (ids, att, labels), lengths, batch, steps * batch, padding=padding,
                          group_by_length=group)
        t0 = now()
        out["losses"] = pt.epoch()
        out["seconds_incl_compile"] = now() - t0
        out["batch_lengths"] = pt.batch_lengths
    out["peak_rss_mib"] = peak_rss_mib()
    emit("RSS_JSON", out)


def _rss_case(s_model, tokenizer, examples, *, seq, batch, steps, peers, remat=False) -> dict:
    from duet_jax.data import EncodeConfig, encode_examples
    from duet_jax.models import save_hf

    t = encode_examples(examples, tokenizer, EncodeConfig(max_length=seq, buckets=(seq,)))
    res = {}
    with tempfile.TemporaryDirectory(prefix="duet-bench-ft-") as d:
        save_hf(s_model, os.path.join(d, "model"))
        ids_path = os.path.join(d, "ids.npz")
        np.savez(ids_path, input_ids=t.input_ids, loss_mask=t.loss_mask, lengths=t.lengths,
                 prompt_lengths=t.prompt_lengths, answer_lengths=t.answer_lengths, pad_id=t.pad_id)
        for side_ in ("ours", *peers):
            res[side_] = run_child("duet_jax.bench.finetune", "_rss_child",
                                   (side_, os.path.join(d, "model"), ids_path, seq, batch, steps, remat), "RSS_JSON")
    o = res["ours"]
    n = steps * batch
    rate = lambda r: n / r["seconds_incl_compile"] if r.get("seconds_incl_compile") else None
    psides = {p: side(rate(res[p]), seconds=res[p].get("seconds_incl_compile"), peak_rss_mib=res[p].get("peak_rss_mib"),
                      after_load_mib=res[p].get("after_load_mib"), batch_lengths=res[p].get("batch_lengths"),
                      what=f"PEFT, {PEERS[p][0]} padding, first {steps} steps") for p in peers}
    extra = dict(seq=seq, batch=batch, steps=steps, examples=n,
                 ours_peak_rss_mib=o.get("peak_rss_mib"), ours_after_load_mib=o.get("after_load_mib"),
                 ours_after_compile_mib=o.get("after_compile_mib"), ours_stages=o.get("stages"),
                 ours_compiled_temp_mib=o.get("compiled_temp_mib"),
                 ours_compiled_argument_mib=o.get("compiled_argument_mib"),
                 ours_compiles=o.get("compiles"), ours_losses=o.get("losses"),
                 goal_mib=4096, ours_meets_goal=(o.get("peak_rss_mib") or 1e18) < 4096, remat=remat,
                 note="memory is the point of this case; examples/s here are steps x batch over the time of "
                      "the call (ours: a cached-compile call, peers: the first steps), so their fractions of "
                      "the matmul peak are not computed")
    for p in peers:
        extra[f"{p}_peak_rss_mib"] = res[p].get("peak_rss_mib")
    if "peft_fixed" in peers:
        extra.update(peer_peak_rss_mib=res["peft_fixed"].get("peak_rss_mib"),
                     peer_after_load_mib=res["peft_fixed"].get("after_load_mib"))
    mems = {p: res[p].get("peak_rss_mib") for p in peers if res[p].get("peak_rss_mib")}
    extra["lowest_memory_peer"] = min(mems, key=mems.get) if mems else None
    for side_, r in res.items():
        if "error" in r:
            extra[f"{side_}_error"] = r["error"]
    ours_side = side(rate(o), seconds=o.get("seconds_incl_compile"), peak_rss_mib=o.get("peak_rss_mib"),
                     what="duet_jax.train.finetune in a fresh process")
    return {"name": "peak_rss", "ours": ours_side, "peers": psides, "extra": extra}


# ------------------------------------------------------------------------------------ run
def run(model_spec: str = "smollm2-135m-instruct", *, domain: str = "arc_easy", quick: bool = False,
        examples: int | None = None, seq_len: int | None = None, batch: int = 8,
        repeats: int | None = None, last_layers: int = 4, k: int = 4, rss_seq_len: int = 256,
        cases=CASES, peer: bool = True, peers=tuple(PEERS), matmul_n: int = 2048, model=None,
        tokenizer=None, example_list=None, progress=None, remat: bool = False) -> dict:
    """Run the cases; returns ``{"cases": [...], ...settings}``. ``model`` / ``tokenizer`` /
    ``example_list`` override the spec (tests pass a tiny random model)."""
    say = progress or (lambda msg: None)
    n = examples or (16 if quick else 32)
    seq = seq_len or (64 if quick else 128)
    reps = repeats or 2
    cases = tuple(cases)
    bad = [c for c in cases if c not in CASES] + [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"unknown case(s) or peer(s) {bad}; cases: {', '.join(CASES)}; peers: {', '.join(PEERS)}")
    peers = tuple(peers) if peer else ()
    if peers:
        require_peer()
    t0 = now()
    if model is None:
        from duet_jax.models import load_model
        model = load_model(model_spec, dtype="float32")
    if tokenizer is None:
        from duet_jax.data import load_tokenizer
        tokenizer = load_tokenizer(model_spec)
    exs = example_list if example_list is not None else bench_examples(domain, n)
    load_s = now() - t0
    s = _Setup(model, tokenizer, exs, seq)
    say(f"setup: {len(s.pool)} examples, pool {len(s.pool)} x {s.pool.length} "
        f"(answer slots {s.pool.answer_slots}); {100 * s.real_token_fraction:.0f}% of the fixed peer's "
        f"{seq}-token positions are real tokens, {100 * s.answer_fraction:.1f}% carry loss")
    peak = MatmulPeak(matmul_n)
    say(f"matmul peak {peak.sample():.1f} GFLOP/s")
    if peers:
        peak.add(torch_matmul_peak_gflops(matmul_n), "torch")
    raws, out = [], []
    ll = min(last_layers, model.config.num_layers - 1)
    for name in cases:
        t1 = now()
        if name == "full_lora":
            r = _train_case(name, s, last_layers=None, batch=batch, repeats=reps, peers=peers, use_trunk=False)
        elif name == "frozen_trunk":
            r = _train_case(name, s, last_layers=ll, batch=batch, repeats=reps, peers=peers, use_trunk=True)
        elif name == "k4_vmapped":
            r = _k_case(s, last_layers=ll, batch=batch, repeats=reps, k=k)
        elif name == "eval_loglik":
            r = _eval_case(s, batch=batch, repeats=reps, peers=peers, last_layers=ll)
        else:
            r = _rss_case(model, tokenizer, exs, seq=rss_seq_len, batch=batch, steps=1 if quick else 2,
                          peers=peers, remat=remat)
        r["extra"]["case_wall_s"] = now() - t1
        raws.append(r)
        c = _finish(r, peak.peak)
        out.append(c)
        say(_line(c))
    peak.sample()
    out = [_finish(r, peak.peak) for r in raws]  # every fraction against the final (largest) peak
    info = {"model": model_spec if example_list is None else "custom", "domain": domain,
            "examples": len(s.pool), "seq_len": seq, "batch": batch, "repeats": reps, "quick": quick,
            "peers": list(peers), **peak.info(), "real_token_fraction": s.real_token_fraction,
            "loss_token_fraction": s.answer_fraction, **machine_info(), "load_s": load_s,
            "load_average_end": load_average()}
    if peers:
        info.update(peer_versions())
    return {"cases": out, **info}


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _line(c) -> str:
    o = c["ours"]
    s = f"{c['name']:<13} ours {_fmt(o['examples_per_s'], '8.2f')} ex/s"
    if o.get("fraction_of_matmul_peak") is not None:
        s += f" ({100 * o['fraction_of_matmul_peak']:.0f}% of peak)"
    for k, p in c["peers"].items():
        s += f"   {k} {_fmt(p['examples_per_s'], '.2f')} ex/s"
        if p.get("fraction_of_matmul_peak") is not None:
            s += f" ({100 * p['fraction_of_matmul_peak']:.0f}%)"
    if c["strongest_peer"]:
        s += f"   vs strongest ({c['strongest_peer']}) {_fmt(c['ratio_vs_strongest'])}x"
    if c.get("ratio_with_trunk") is not None:
        s += f"   (with the trunk pass: {c['ratio_with_trunk']:.2f}x, trunk {c['trunk_s']:.1f} s)"
    if c["name"] == "peak_rss":
        s += (f"   peak RSS ours {_fmt(c.get('ours_peak_rss_mib'), '.0f')} MiB, "
              + ", ".join(f"{k} {_fmt(p.get('peak_rss_mib'), '.0f')} MiB" for k, p in c["peers"].items())
              + " (goal < 4096)")
    for k in c["peers"]:
        if f"{k}_max_abs_loglik_diff" in c:
            s += f"   {k} max |loglik diff| {c[f'{k}_max_abs_loglik_diff']:.1e}"
    return s


def main(args) -> int:
    progress = None if args.json else (lambda m: print(m, flush=True))
    r = run(args.model, domain=args.domain, quick=args.quick, examples=args.examples,
            seq_len=args.seq_len, batch=args.batch, repeats=args.repeats,
            last_layers=args.last_layers, k=args.k, rss_seq_len=args.rss_seq_len,
            cases=[c.strip() for c in args.cases.split(",") if c.strip()], peer=not args.no_peer,
            peers=[p.strip() for p in args.peers.split(",") if p.strip()], progress=progress, remat=args.remat)
    if args.json:
        info = {k: v for k, v in r.items() if k != "cases"}
        print(json.dumps([{**c, "run": info} for c in r["cases"]]))
        return 0
    print(f"{r['model']} on {r['domain']}: {r['examples']} examples, fixed peer batches {r['batch']} x "
          f"{r['seq_len']}, {r['device']}, {r['cpu_count']} CPUs, matmul peak "
          f"{r['matmul_peak_gflops']:.1f} GFLOP/s; {r.get('peer', 'no peer')}")
    for c in r["cases"]:
        print("  " + _line(c))
    return 0
