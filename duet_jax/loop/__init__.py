"""The pieces of the DUET loop (Algorithm 1), each in a file named for it.

* :mod:`~duet_jax.loop.setting`: what every method shares (data plan, model, pool, trunk cache,
  influence scores on demand).
* :mod:`~duet_jax.loop.proposers`: the global step (ask / tell on the simplex).
* :mod:`~duet_jax.loop.selectors`: sampling inside each domain.
* :mod:`~duet_jax.loop.local_step`: ``(ratio, key) -> k adapters, k feedbacks``, one compiled program.
* :mod:`~duet_jax.loop.feedback`: one protocol for every feedback source.
* :mod:`~duet_jax.loop.proxies`: the baselines' proxy runs (DoReMi, RegMix, Aioli-style).
* :mod:`~duet_jax.loop.methods`: ``--method NAME`` = a proposer + a selector.
* :mod:`~duet_jax.loop.shell`: the run directory, lock, history, resume, best adapter.

:func:`duet_jax.duet.run` puts them together.
"""
