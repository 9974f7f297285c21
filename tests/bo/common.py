"""Shared settings of the BO tests.

``FAST`` is the cheaper setting the tests run the optimiser with (CI has 2 cores): fewer fit starts
and steps, fewer raw candidates and ascent starts than the defaults. Tests that compile a full
round share it (and ``FAST_CAP``-sized data) so each shape compiles once per session.
"""

import numpy as np
from hypothesis import strategies as st

from duet_jax.bo import BOConfig

FAST_FIELDS = dict(fit_restarts=4, fit_steps=60, n_raw=128, n_starts=4, ascent_steps=20,
                   ts_candidates=128)
FAST = BOConfig(**FAST_FIELDS)


def on_simplex(x, tol=1e-9):
    """Rows of ``x`` are ratios: no negative share, sum one within ``tol``."""
    x = np.asarray(x)
    return bool(np.all(x >= 0.0) and np.all(np.abs(x.sum(-1) - 1.0) <= tol))


D = 5


@st.composite
def bounds(draw, d=D):
    """Feasible per-domain bounds (sum lower <= 1 <= sum upper), some domains fixed."""
    lo = np.array(draw(st.lists(st.floats(0.0, 0.5), min_size=d, max_size=d)))
    width = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=d, max_size=d)))
    hi = np.minimum(lo + width, 1.0)
    lo = lo * min(1.0, 0.95 / max(lo.sum(), 1e-12))  # sum lower < 1
    hi = np.maximum(hi, lo)
    if hi.sum() < 1.0:  # open the widest gaps until the upper bounds reach one
        hi = np.minimum(1.0, hi + (1.0 - hi.sum()) / d + 1e-3)
        hi = np.where(hi.sum() < 1.0, 1.0, hi)
    return lo, hi
