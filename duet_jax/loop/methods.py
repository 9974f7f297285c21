"""Every method a run can use (``--method NAME``): a proposer of ratios and a selector inside
domains, plus the proxy runs that some baselines need before they propose.

All methods get the same number of feedback evaluations on the unseen task (``warm_start +
rounds``). Methods that use no feedback (``uniform``, ``doremi``, ``regmix``, ``aioli``) propose one
ratio and have it evaluated that many times with fresh samples, so their spread is known too.
Proxy fine-tunes are counted apart (``summary.json``: ``proxy_finetunes``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["METHODS", "Method"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A proposer and a selector.

    Attributes:
      name: the ``--method`` value.
      proposer: ``bo`` (SimplexBO after the warm start), ``random`` (Dirichlet draws), ``uniform``
        (the fixed uniform ratio), or a proxy method (``doremi``, ``regmix``, ``aioli``) that
        proposes the ratio its proxy runs found.
      selector: ``if``, ``uniform``, ``remove_harmful`` or ``less``
        (:mod:`duet_jax.loop.selectors`).
      uses_feedback: whether the unseen task's feedback steers the proposals.
      oracle: sees data of the unseen task (DUET-LESS): not a fair competitor, labelled as such.
      summary: one line for ``--help`` and the docs.
    """

    name: str
    proposer: str
    selector: str
    uses_feedback: bool
    oracle: bool
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("duet_if", "bo", "if", True, False, "DUET: BO over the ratio + influence-weighted sampling"),
    Method("duet_ur", "bo", "uniform", True, False, "DUET-UR: BO + uniform sampling inside domains"),
    Method("duet_rh", "bo", "remove_harmful", True, False, "DUET-RH: BO + the lowest-IF examples removed"),
    Method("duet_less", "bo", "less", True, True,
           "DUET-LESS (oracle): BO + gradient similarity to a few unseen-task examples"),
    Method("uniform", "uniform", "uniform", False, False, "the uniform ratio, uniform sampling"),
    Method("random_search", "random", "uniform", True, False,
           "random Dirichlet(1) ratios (after the same warm start), best kept"),
    Method("doremi", "doremi", "uniform", False, False,
           "DoReMi: reference + proxy trained with excess-loss group DRO; averaged domain weights"),
    Method("regmix", "regmix", "uniform", False, False,
           "RegMix: proxy fine-tunes at random ratios scored on the domains' validation sets, a "
           "regression, its predicted best"),
    Method("aioli", "aioli", "uniform", False, False,
           "Aioli-style: ratio updated from probes of how each domain moves the domains' validation "
           "losses"),
)}
