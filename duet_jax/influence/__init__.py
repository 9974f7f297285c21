"""duet_jax.influence: jitted per-example gradients, seeded projections, curvature, scoring.

Three stages, as in TRAK: ``featurize`` (projected per-example gradients) -> ``finalize``
(curvature) -> ``score`` (``[n_train, n_query]``, higher = up-weighting the training example
lowers the query loss). Works for any pure ``loss_fn(params, example) -> scalar``::

    import jax, jax.numpy as jnp
    from duet_jax.influence import InfluenceScorer

    def loss_fn(w, ex):                      # logistic regression, one example
        return jax.nn.softplus(-ex["y"] * (ex["x"] @ w)) + 0.5e-2 * (w @ w)

    x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    y = jnp.sign(x[:, 0] + 0.1)
    w = jnp.zeros(8)
    scorer = InfluenceScorer(loss_fn, proj_dim=32, projector="sjlt", curvature="fisher",
                             damping=1e-2, seed=0, batch_size=16)
    train = scorer.featurize(w, {"x": x, "y": y})                         # [64, 32]
    val = scorer.featurize_query(w, {"x": x[:8], "y": y[:8]}, mean=True)  # [1, 32]
    scores = scorer.score(scorer.finalize(train), val)                    # [64, 1]

DUET's IF score of a training example z for its domain is ``g_val^T H^-1 g_z`` with ``g_val`` the
mean validation gradient (``featurize_query(..., mean=True)``): the paper's
``IF(z) = -g_val^T H^-1 g_z`` read as "higher = more helpful" (see :mod:`.scorer` for the sign).
See docs/influence.md.
"""

from duet_jax.influence.curvature import (
    CURVATURES,
    adam_preconditioner,
    cg_solve,
    fisher_inverse,
    hvp_fn,
    lissa_solve,
)
from duet_jax.influence.projectors import (
    PROJECTORS,
    Projector,
    make_projector,
    pallas_interpret,
    sjlt_buckets,
)
from duet_jax.influence.scorer import (
    Finalized,
    InfluenceScorer,
    per_example_grads,
    safe_masked_mean,
)
from duet_jax.influence.store import (
    FeatureStore,
    StoreMismatchError,
    featurize_into_store,
    params_fingerprint,
    store_metadata,
)

__all__ = [
    "CURVATURES",
    "PROJECTORS",
    "FeatureStore",
    "Finalized",
    "InfluenceScorer",
    "Projector",
    "StoreMismatchError",
    "adam_preconditioner",
    "cg_solve",
    "featurize_into_store",
    "fisher_inverse",
    "hvp_fn",
    "lissa_solve",
    "make_projector",
    "pallas_interpret",
    "params_fingerprint",
    "per_example_grads",
    "safe_masked_mean",
    "sjlt_buckets",
    "store_metadata",
]
