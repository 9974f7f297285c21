"""``duet-jax bench model``: forward tokens/s of our Flax NNX decoder against PyTorch transformers
on the same float32 weights, same machine, same run, printed as a ratio (ours / peer).

The peer is transformers' ``*ForCausalLM`` (``LlamaForCausalLM`` for SmolLM2) built from our
config (``ModelConfig.to_hf``) with our weights (``hf_state_dict``), so both compute the same
function; the largest logit difference is reported as a check. Both time the full forward to
logits over ``batch x seq_len`` tokens (median of ``--repeats`` after a warm-up; JAX compile time
reported apart). torch comes from the ``bench`` extra (``make bench-setup``).

JSON fields: ``ours_tokens_per_s``, ``peer_tokens_per_s``, ``ratio``, ``max_abs_logit_diff``,
``compile_s``, ``load_s`` and the settings; ``cases`` holds the same comparison in the shape every
bench uses (:func:`duet_jax.bench.common.compare`: ``strongest_peer``, ``ratio_vs_strongest`` and
each side's fraction of the matmul peak measured in the same run; rates there are tokens/s).
"""

from __future__ import annotations

import json

import numpy as np

from duet_jax.bench.common import (
    MatmulPeak,
    compare,
    machine_info,
    median_time,
    now,
    side,
    torch_matmul_peak_gflops,
    train_flops,
)

HELP = "model forward tokens/s vs PyTorch transformers on the same weights"

__all__ = ["HELP", "add_arguments", "main", "run"]


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true", help="skip the torch peer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(model_spec: str = "smollm2-135m-instruct", *, batch: int = 1, seq_len: int = 128,
        repeats: int = 5, peer: bool = True, matmul_n: int = 2048) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from duet_jax.models import hf_state_dict, load_model

    t0 = now()
    model = load_model(model_spec, dtype="float32")
    load_s = now() - t0
    cfg = model.config
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    x = jnp.asarray(toks)
    t0 = now()
    ours_logits = np.asarray(fwd(state, x))
    compile_s = now() - t0
    ours_s = median_time(lambda: fwd(state, x).block_until_ready(), repeats, warmup=False)[0]
    n = batch * seq_len
    gflops = train_flops(cfg, rows=batch, seq=seq_len, head_positions=n, first_trained=None) / 1e9
    peak = MatmulPeak(matmul_n)
    peak.sample()
    result = {
        "model": model_spec, "params": int(cfg.num_params), "batch": batch, "seq_len": seq_len,
        "repeats": repeats, **machine_info(), "load_s": round(load_s, 3), "compile_s": round(compile_s, 3),
        "ours_s": ours_s, "ours_tokens_per_s": n / ours_s,
    }
    ours = side(n / ours_s, seconds=ours_s, gflops=gflops, what="Flax NNX forward (jit), tokens/s")

    def finish(peers):
        result["cases"] = [compare("forward", ours, peers, peak.peak, unit="tokens/s")]
        c = result["cases"][0]
        result.update(strongest_peer=c["strongest_peer"], ratio_vs_strongest=c["ratio_vs_strongest"],
                      ours_fraction_of_matmul_peak=c["ours"]["fraction_of_matmul_peak"], **peak.info())
        return result

    if not peer:
        return finish({})
    try:
        import torch
        import transformers
    except ImportError as e:
        result["peer_error"] = f"{e}; install the bench extra (make bench-setup)"
        return finish({})
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    tm = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    sd = {k: torch.from_numpy(v) for k, v in hf_state_dict(model).items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise RuntimeError(f"peer weights did not load: missing {missing}, unexpected {unexpected}")
    tm.tie_weights()
    xt = torch.from_numpy(toks.astype(np.int64))
    with torch.inference_mode():
        peer_logits = tm(xt).logits.float().numpy()  # warm-up
        peer_s = median_time(lambda: tm(xt), repeats, warmup=False)[0]
    peak.add(torch_matmul_peak_gflops(matmul_n), "torch")
    result.update(
        peer="transformers " + transformers.__version__ + " / torch " + torch.__version__,
        torch_threads=torch.get_num_threads(),
        peer_s=peer_s, peer_tokens_per_s=n / peer_s, ratio=peer_s / ours_s,
        max_abs_logit_diff=float(np.abs(peer_logits - ours_logits).max()),
    )
    return finish({"transformers": side(n / peer_s, seconds=peer_s, gflops=gflops,
                                        what="transformers forward (eager PyTorch), tokens/s")})


def main(args) -> int:
    r = run(args.model, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
            peer=not args.no_peer)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"model {r['model']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']} x "
          f"{r['seq_len']} tokens, {r['device']}, {r['cpu_count']} CPUs")
    print(f"  duet-jax (Flax NNX, jit): {r['ours_tokens_per_s']:10.1f} tokens/s "
          f"(compile {r['compile_s']:.1f} s)")
    if "peer_tokens_per_s" in r:
        print(f"  {r['peer']}: {r['peer_tokens_per_s']:10.1f} tokens/s")
        print(f"  ratio (ours / peer): {r['ratio']:.2f}x   max |logit diff| "
              f"{r['max_abs_logit_diff']:.2e}")
    elif "peer_error" in r:
        print(f"  peer skipped: {r['peer_error']}")
    return 0
