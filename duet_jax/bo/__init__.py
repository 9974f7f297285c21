"""duet_jax.bo."""
