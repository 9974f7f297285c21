"""Pallas kernels, installed as ``duet_kernels``; each next to its pure-jnp reference."""
