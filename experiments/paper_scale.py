"""Paper-scale configurations of the settings (issue 16) and their expected cost per evaluation.

::

    python -m experiments.paper_scale            # writes experiments/results/paper_scale.json

The paper's protocol (the ``paper`` preset: M = 10,000, k = 1, T = 10 rounds after 50 warm-start
mixtures, LoRA r = 16 on every layer, max_length 512, bf16, remat) on Llama-3-8B-Instruct and
Qwen2.5-7B-Instruct, for the four settings of ``experiments/settings.py``. Nothing here is
measured: the cost is the matmul FLOP count of one evaluation (:func:`duet_jax.bench.common.train_flops`,
the count the fine-tune bench uses, which matched the measured CPU throughput there) divided by an
assumed fraction of the accelerator's bf16 peak (``MFU``, stated beside every number). Replace the
estimate with a measurement when an accelerator is lent (``experiments/accelerator_check.sh``).

The run command of a cell is ``python -m duet_jax.run`` with the printed flags (a checkpoint
directory in ``--model``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "paper_scale.json"

#: the shapes of the two checkpoints (their config.json), as duet_jax ModelConfig fields
MODELS = {
    "llama3-8b-instruct": dict(architecture="llama", vocab_size=128256, hidden_size=4096,
                               intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                               rope_theta=500000.0, tie_word_embeddings=False,
                               name="meta-llama/Meta-Llama-3-8B-Instruct"),
    "qwen2.5-7b-instruct": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                                intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                                rope_theta=1000000.0, tie_word_embeddings=False, qkv_bias=True,
                                name="Qwen/Qwen2.5-7B-Instruct"),
}
#: dense bf16 peak per chip / GPU (vendor figures), and how many a host has
HARDWARE = {"tpu-v5e-8": (197e12, 8), "tpu-v4-8": (275e12, 4), "1x H100/H200 (SXM)": (989e12, 1)}
MFU = (0.25, 0.40, 0.55)  # assumed fractions of the peak: low / middle / high

#: assumptions of the count (stated in the output): mean tokens per row after bucketing, answer
#: slots per row, feedback examples and choices (acc_norm scores every choice of a question)
ASSUME = {"budget_M": 10_000, "epochs": 1.0, "seq_tokens": 256, "seq_max": 512, "answer_slots": 16,
          "feedback_examples": 1_000, "choices": 4, "lora_rank": 16, "remat": True,
          "warm_start": 50, "rounds": 10}


def model_config(name: str):
    from duet_jax.models.config import ModelConfig

    return ModelConfig(**MODELS[name])


def evaluation_flops(cfg, a: dict = ASSUME) -> dict:
    """Matmul FLOPs of one feedback evaluation: the fine-tune (LoRA on every layer, so the backward
    runs through all of them; remat adds one more forward) and the feedback's forward passes."""
    from duet_jax.bench.common import train_flops

    rows = int(a["budget_M"] * a["epochs"])
    seq = a["seq_tokens"]
    head = rows * a["answer_slots"]
    train = train_flops(cfg, rows=rows, seq=seq, head_positions=head, start=0, first_trained=0,
                        lora_layers=cfg.num_layers, lora_rank=a["lora_rank"])
    if a["remat"]:
        train += train_flops(cfg, rows=rows, seq=seq, head_positions=0, first_trained=None)
    fb_rows = a["feedback_examples"] * a["choices"]
    feedback = train_flops(cfg, rows=fb_rows, seq=seq, head_positions=fb_rows * a["answer_slots"],
                           first_trained=None)
    return {"finetune": train, "feedback": feedback, "total": train + feedback}


def estimate() -> dict:
    from experiments.settings import SETTINGS

    out = {"assumptions": ASSUME, "mfu": list(MFU), "hardware_bf16_peak": {h: p * n for h, (p, n) in HARDWARE.items()},
           "models": {}, "commands": {}}
    for name in MODELS:
        cfg = model_config(name)
        f = evaluation_flops(cfg)
        n_eval = ASSUME["warm_start"] + ASSUME["rounds"]
        per_hw = {}
        for hw, (peak, n) in HARDWARE.items():
            secs = {f"{m:.2f}": f["total"] / (peak * n * m) for m in MFU}
            per_hw[hw] = {"seconds_per_evaluation": secs,
                          "hours_per_run": {k: v * n_eval / 3600 for k, v in secs.items()}}
        out["models"][name] = {"flops_per_evaluation": f, "evaluations_per_run": n_eval, "hardware": per_hw}
    for st, spec in SETTINGS.items():
        out["commands"][st] = (
            f"python -m duet_jax.run --preset paper --model /path/to/checkpoint --mode {spec.mode} "
            f"--domains {','.join(spec.domains)} --target {spec.target() if not spec.combined else '<combined file>'} "
            "--train.remat true --mesh.fsdp <chips>")
    return out


def markdown(est: dict) -> list[str]:
    a = est["assumptions"]
    lines = ["## Paper-scale configurations (estimates, not measurements)", "",
             f"The `paper` preset (M = {a['budget_M']:,}, {a['warm_start']} warm-start mixtures + {a['rounds']} rounds, "
             f"k = 1, LoRA r = {a['lora_rank']} on every layer, max_length {a['seq_max']}, bf16, remat) per setting: "
             "`python -m duet_jax.run --preset paper --model CHECKPOINT_DIR` with the setting's `--mode`, `--domains` "
             "and `--target` (the combined targets are files, `experiments/targets/`). Expected cost: the matmul FLOPs "
             f"of one evaluation (`duet_jax.bench.common.train_flops`; {a['seq_tokens']} tokens per row after bucketing, "
             f"{a['answer_slots']} answer slots, remat's extra forward, a feedback of {a['feedback_examples']:,} "
             f"questions x {a['choices']} choices) over an assumed fraction of the bf16 peak (MFU). Made by "
             "`python -m experiments.paper_scale`; the influence step (once per run) is not included.", "",
             "| model | TFLOP / evaluation | hardware | s / evaluation at MFU " + " / ".join(f"{m:.0%}" for m in est["mfu"])
             + " | hours per run (middle MFU) |", "| --- | --- | --- | --- | --- |"]
    for name, m in est["models"].items():
        tf = m["flops_per_evaluation"]["total"] / 1e12
        for hw, h in m["hardware"].items():
            secs = h["seconds_per_evaluation"]
            mid = f"{est['mfu'][1]:.2f}"
            lines.append(f"| {name} | {tf:,.0f} | {hw} | " + " / ".join(f"{v:,.0f}" for v in secs.values())
                         + f" | {h['hours_per_run'][mid]:.1f} |")
    return lines + [""]


def main(argv=None) -> int:
    est = estimate()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(est, indent=1) + "\n")
    print("\n".join(markdown(est)))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
