"""duet_jax.feedback."""
