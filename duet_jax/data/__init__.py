"""duet_jax.data."""
