"""Shared settings of the BO tests.

``FAST`` is the cheaper setting the tests run the optimiser with (CI has 2 cores): fewer fit starts
and steps, fewer raw candidates and ascent starts than the defaults. Tests that compile a full
round share it (and ``FAST_CAP``-sized data) so each shape compiles once per session.
"""

import numpy as np

from duet_jax.bo import BOConfig

FAST = BOConfig(fit_restarts=4, fit_steps=60, n_raw=128, n_starts=4, ascent_steps=20,
                ts_candidates=128)


def on_simplex(x, tol=1e-9):
    """Rows of ``x`` are ratios: no negative share, sum one within ``tol``."""
    x = np.asarray(x)
    return bool(np.all(x >= 0.0) and np.all(np.abs(x.sum(-1) - 1.0) <= tol))
