#!/usr/bin/env bash
# One prepared check of duet-jax on a machine with an accelerator (GPU or TPU), at most ~8 minutes.
#
#   bash experiments/accelerator_check.sh            # from the repository root
#
# What it does (each part has its own time limit and the script goes on after a failure; the
# summary at the end lists what passed):
#   0. versions, devices; installs wheels from $WHEELS (default experiments/wheels) with --no-index
#      when that folder exists (a machine without network brings its own JAX/flax/optax/orbax);
#   1. the multidevice tests (8 forced host devices on CPU: the sharding logic on this JAX version);
#   2. the Pallas projector compiled for the accelerator (not interpreted) against its jnp reference;
#   3. fine-tune and influence-featurize throughput at sequence length 512 on SmolLM2-135M's shapes
#      with random weights (bf16 compute, float32 LoRA), printing examples/s, tokens/s and the
#      fraction of the chip's bf16 peak (FLOPs from XLA's cost analysis of the compiled program);
#   4. a short DUET smoke run (python -m duet_jax.run --preset smoke).
# Results go to stdout and, as JSON lines, to $OUT/accelerator_check.jsonl ($OUT defaults to
# ./accelerator_check_out). Set PEAK_TFLOPS to override the bf16 peak table below. QUICK=1 shrinks
# every size (a CPU dry run of the script itself, not a measurement); SKIP="multidevice smoke" skips
# parts by name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-./accelerator_check_out}
WHEELS=${WHEELS:-experiments/wheels}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/accelerator_check.jsonl"
: > "$RESULTS"
export RESULTS
declare -A STATUS

run_part() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then STATUS[$name]="skipped"; echo "=== $name: skipped ==="; return; fi
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s ==="
}

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  run_part wheels 120 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
# duet_kernels is the kernels/ folder (pyproject's package-dir); without an install, link it.
if ! "$PY" -c "import duet_kernels" 2>/dev/null; then
  mkdir -p "$OUT/pkgs" && ln -sfn "$PWD/kernels" "$OUT/pkgs/duet_kernels"
  export PYTHONPATH="$PYTHONPATH:$PWD/$OUT/pkgs"
fi

run_part versions 30 "$PY" - <<'EOF'
import json, os, platform, jax, flax, optax
info = dict(part="versions", python=platform.python_version(), jax=jax.__version__,
            flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(),
            devices=[d.device_kind for d in jax.devices()])
print(json.dumps(info))
open(os.environ["RESULTS"], "a").write(json.dumps(info) + "\n")
EOF

run_part multidevice 200 env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  "$PY" -m pytest -q -p no:cacheprovider -m multidevice tests/multidevice

run_part pallas 40 "$PY" - <<'EOF'
import json, os, time
import jax, jax.numpy as jnp, numpy as np
from duet_kernels.projection import project_pallas, project_reference
quick = os.environ.get("QUICK") == "1"
interp = quick and jax.default_backend() == "cpu"  # the CPU dry run interprets; a device compiles
x = jax.random.normal(jax.random.key(0), (16, (1 << 12) if quick else (1 << 20)), jnp.float32)
k = 256 if quick else 4096
ref = np.asarray(project_reference(x, seed=7, k=k))
got = project_pallas(x, seed=7, k=k, interpret=interp).block_until_ready()
t = time.perf_counter(); got = project_pallas(x, seed=7, k=k, interpret=interp).block_until_ready(); dt = time.perf_counter() - t
err = float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())
res = dict(part="pallas", shape=list(x.shape), k=k, interpreted=interp, rel_err=err, ok=err < 1e-4, seconds=dt,
           gb_per_s=x.size * 4 / dt / 1e9)
print(json.dumps(res)); open(os.environ["RESULTS"], "a").write(json.dumps(res) + "\n")
assert res["ok"], res
EOF

run_part throughput 150 "$PY" - <<'EOF'
import json, os, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from duet_jax.models import LlamaModel, LoRAConfig, ModelConfig, add_lora
from duet_jax.train import TrainConfig, split_model
from duet_jax.train import trainer
from duet_jax.train.pool import Pool
from duet_jax.influence import InfluenceScorer
from duet_jax.influence.domains import example_loss_fn

PEAK = {"H200": 989, "H100": 989, "A100": 312, "L4": 121, "A10": 125, "TPU v4": 275, "TPU v5 lite": 197,
        "TPU v5e": 197, "TPU v5p": 459, "TPU v6": 918}
kind = jax.devices()[0].device_kind
peak = float(os.environ.get("PEAK_TFLOPS") or next((v for k, v in PEAK.items() if k in kind), 0)) * 1e12
quick = os.environ.get("QUICK") == "1"
cfg = ModelConfig.preset("smollm2-135m", **({"num_layers": 2} if quick else {}))
model = LlamaModel(cfg, dtype="bfloat16", param_dtype="bfloat16", rngs=nnx.Rngs(0))
add_lora(model, LoRAConfig(rank=8, alpha=16, targets=("q", "k", "v", "o")), rngs=nnx.Rngs(1))
g, lora, frozen = split_model(model)
N, T, A, B, steps = (16, 64, 4, 8, 2) if quick else (256, 512, 16, 8, 20)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (N, T)).astype(np.int32)
pos = np.tile(np.arange(T - A - 1, T - 1, dtype=np.int32), (N, 1))
pool = Pool(jnp.asarray(ids), jnp.ones((N, T), jnp.int32), jnp.asarray(pos), jnp.asarray(ids[:, -A:]),
            jnp.ones((N, A), jnp.float32), jnp.ones((N, A), jnp.float32))
out = open(os.environ["RESULTS"], "a")

def report(name, ex_per_s, tok_per_s, flops_per_s, **kw):
    res = dict(part="throughput", case=name, device=kind, examples_per_s=ex_per_s, tokens_per_s=tok_per_s,
               tflops=flops_per_s / 1e12, peak_fraction=(flops_per_s / peak) if peak else None, **kw)
    print(json.dumps(res)); out.write(json.dumps(res) + "\n"); out.flush()

for remat in (False, True):
    tc = TrainConfig(steps=steps, batch_size=B, remat=remat)
    idx = jnp.arange(N, dtype=jnp.int32)
    t0 = time.perf_counter()
    comp = trainer._finetune_jit.lower(g, lora, frozen, pool, idx, jax.random.key(0), config=tc,
                                       steps=steps, start=0).compile()
    compile_s = time.perf_counter() - t0
    cost = comp.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    res = trainer._finetune_jit(g, lora, frozen, pool, idx, jax.random.key(0), config=tc, steps=steps, start=0)
    jax.block_until_ready(res)
    t0 = time.perf_counter()
    res = trainer._finetune_jit(g, lora, frozen, pool, idx, jax.random.key(1), config=tc, steps=steps, start=0)
    jax.block_until_ready(res)
    dt = time.perf_counter() - t0
    report(f"finetune_full_lora_remat={remat}", steps * B / dt, steps * B * T / dt, flops / dt,
           compile_s=compile_s, seconds=dt, final_loss=float(res.losses[-1]))

for projector in ("sjlt", "pallas"):
    try:
        opts = {"interpret": True} if (projector == "pallas" and jax.default_backend() == "cpu") else {}
        scorer = InfluenceScorer(example_loss_fn(g, 0), proj_dim=8192, projector=projector, batch_size=8,
                                 projector_options=opts)
        n_f = 16 if quick else 64
        sub = jax.tree.map(lambda a: a[:n_f], pool)
        f = scorer.featurize(lora, sub, context=frozen); jax.block_until_ready(f)
        t0 = time.perf_counter(); f = scorer.featurize(lora, sub, context=frozen); jax.block_until_ready(f)
        dt = time.perf_counter() - t0
        n_params = sum(x.size for x in jax.tree.leaves(frozen))
        fwd_bwd = 3 * 2 * n_params * n_f * T  # about 3 forward passes of 2 * params FLOPs per token
        report(f"featurize_{projector}", n_f / dt, n_f * T / dt, fwd_bwd / dt, seconds=dt,
               note="FLOPs estimated as 6 * params * tokens")
    except Exception as e:  # report and go on
        print(json.dumps(dict(part="throughput", case=f"featurize_{projector}", error=repr(e)[:500])))
EOF

run_part smoke 60 "$PY" -m duet_jax.run --preset smoke --out_dir "$OUT/smoke_run" --quiet

echo "=== summary ==="
for k in "${!STATUS[@]}"; do echo "$k: ${STATUS[$k]}"; done
echo "results: $RESULTS"
