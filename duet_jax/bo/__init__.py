"""duet_jax.bo: Gaussian-process Bayesian optimisation of a mixing ratio on the simplex, in JAX.

Needs nothing else of duet-jax: drive any training stack with the ask/tell ``SimplexBO``::

    from duet_jax.bo import SimplexBO
    opt = SimplexBO(dim=4, maximize=True, seed=0)
    r = opt.ask()[0]; opt.tell(r, feedback(r)); ...; ratio, value = opt.best()

Modules (flat): ``config`` (BOConfig), ``runtime`` (local float64, jit options), ``gp`` (TFP-kernel GP in float64: priors, fit, posterior),
``acquisition`` (UCB, EI, LogEI, Thompson, IGP-UCB beta), ``simplex`` (projections, candidates,
designs, min share), ``optimize`` (one jitted round: fit + acquisition ascent + kriging believer),
``loop`` (whole BO runs inside jit, vmapped over seeds; random search), ``synthetic`` (test
functions with known maxima), ``simplex_bo`` (ask/tell, JSON state). See docs/bo.md.
"""

from duet_jax.bo.config import BOConfig
from duet_jax.bo.runtime import x64
from duet_jax.bo.simplex_bo import SimplexBO

__all__ = ["BOConfig", "SimplexBO", "x64"]
