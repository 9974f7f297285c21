"""duet_jax.models."""
