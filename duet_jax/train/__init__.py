"""Compiled LoRA fine-tuning and evaluation (DUET's inner loop).

    from duet_jax.train import build_pool, split_model, trunk_start, trunk_hidden, finetune, TrainConfig
    pool, domain_of = build_pool(tokenized_splits)
    graphdef, lora, frozen = split_model(model)          # model with LoRA attached
    start = trunk_start(model)                           # > 0: the frozen trunk can be cached
    pool = pool.with_hidden(trunk_hidden(graphdef, lora, frozen, pool, start=start))
    result = finetune(graphdef, lora, frozen, pool, indices, key, TrainConfig(epochs=1), start=start)
"""

from duet_jax.train.checkpoint import restore_checkpoint, save_checkpoint
from duet_jax.train.evaluate import (
                                     MCSet,
                                     answer_loss,
                                     build_mc_set,
                                     generation_match,
                                     multiple_choice,
                                     row_scores,
)
from duet_jax.train.forward import slot_logprobs, split_model, trunk_hidden, trunk_start
from duet_jax.train.pool import Pool, build_pool
from duet_jax.train.trainer import (
                                     TrainConfig,
                                     TrainResult,
                                     finetune,
                                     finetune_many,
                                     make_optimizer,
                                     num_steps,
)

__all__ = [
    "MCSet", "Pool", "TrainConfig", "TrainResult", "answer_loss", "build_mc_set", "build_pool",
    "finetune", "finetune_many", "generation_match", "make_optimizer", "multiple_choice",
    "num_steps", "restore_checkpoint", "row_scores", "save_checkpoint", "slot_logprobs",
    "split_model", "trunk_hidden", "trunk_start",
]
