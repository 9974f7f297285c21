"""duet_jax.train."""
