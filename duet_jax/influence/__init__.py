"""duet_jax.influence."""
