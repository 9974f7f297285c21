"""duet_jax.mixture."""
