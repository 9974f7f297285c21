"""duet-jax: DUET data-mixture optimisation from unseen-task feedback, in JAX.

Subpackages (each usable on its own):
  duet_jax.data       domains, splits, tokenization into fixed-shape arrays
  duet_jax.models     Flax NNX Llama-family decoder, LoRA, GGUF / HF loaders
  duet_jax.bo         Gaussian-process Bayesian optimisation on the simplex (ask/tell)
  duet_jax.influence  jitted per-example gradients, projections, curvature, scorer
"""

__version__ = "0.1.0"
