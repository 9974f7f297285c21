"""The proxy runs of the task-agnostic baselines: each finds one ratio from the training domains
alone (their own validation sets), never from the unseen task, and then proposes it for every
feedback evaluation.

* :func:`doremi` (Xie et al. 2023): a reference adapter fine-tuned on the uniform mixture, then a
  proxy adapter trained with excess-loss group DRO over the domains: each step raises the weight
  of the domains whose loss exceeds the reference's (exponentiated gradient, smoothed towards
  uniform) and trains on the weighted loss. The answer is the domain weights averaged over steps.
* :func:`regmix` (Liu et al. 2024): proxy fine-tunes at random Dirichlet ratios, each scored by the
  mean of the domains' validation losses; a ridge regression on the ratio and its pairwise
  products; the mean of the ``regmix_top`` best predicted ratios among ``regmix_candidates``.
* :func:`aioli` (Chen et al. 2024), simplified: in each round, one short probe fine-tune per domain
  at the current ratio leaned towards that domain (``(1 - eps) p + eps e_j``), all from the base
  adapter; how much each probe lowers the domains' validation losses against the probes' mean is
  the gain of leaning towards ``j``; ``p`` moves by exponentiated gradient on those gains. Aioli
  proper re-estimates its mixing law online inside one continuing training run.

Every proxy fine-tune has the run's budget and training settings; their number is reported
(``proxy_finetunes``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from duet_jax.errors import ConfigError

__all__ = ["BaselineConfig", "aioli", "doremi", "domain_losses", "regmix", "run_proxy"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """Options of the baselines' proxy runs.

    Attributes:
      proxy_runs: regmix: proxy fine-tunes at random ratios.
      regmix_candidates: regmix: random ratios the regression ranks.
      regmix_top: regmix: best predicted ratios averaged into the answer.
      regmix_ridge: regmix: ridge penalty of the regression.
      doremi_steps: doremi: DRO steps of the proxy (null: the steps of one fine-tune).
      doremi_eta: doremi: step size of the domain weights' exponentiated gradient.
      doremi_smoothing: doremi: mixing of the domain weights with uniform, each step.
      aioli_rounds: aioli: rounds of probes.
      aioli_eta: aioli: largest log-change of a share in one round.
      aioli_epsilon: aioli: how far each probe leans towards its domain.
    """

    proxy_runs: int = 16
    regmix_candidates: int = 10000
    regmix_top: int = 100
    regmix_ridge: float = 1e-3
    doremi_steps: int | None = None
    doremi_eta: float = 1.0
    doremi_smoothing: float = 1e-3
    aioli_rounds: int = 3
    aioli_eta: float = 1.0
    aioli_epsilon: float = 0.5

    def __post_init__(self):
        for name in ("proxy_runs", "regmix_candidates", "regmix_top", "aioli_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"baselines.{name} must be >= 1, got {getattr(self, name)}")
        if self.doremi_steps is not None and self.doremi_steps < 1:
            raise ConfigError(f"baselines.doremi_steps must be >= 1 or null, got {self.doremi_steps}")
        if not 0 <= self.doremi_smoothing <= 1:
            raise ConfigError(f"baselines.doremi_smoothing must be in [0, 1], got {self.doremi_smoothing}")
        if not 0 < self.aioli_epsilon <= 1:
            raise ConfigError(f"baselines.aioli_epsilon must be in (0, 1], got {self.aioli_epsilon}")
        if not (self.doremi_eta > 0 and self.aioli_eta > 0 and self.regmix_ridge >= 0):
            raise ConfigError("baselines: doremi_eta and aioli_eta must be > 0, regmix_ridge >= 0")


# ------------------------------------------------------------------------------------ helpers
def _mixtures(setting, ratios: np.ndarray, key) -> np.ndarray:
    """One uniformly sampled mixture per ratio: int32 ``[R, M]``."""
    from duet_jax.mixture import sample_mixture, uniform_weights

    cfg = setting.config
    dom = setting.domain_of_device()
    w = uniform_weights(dom)
    out = []
    for i, r in enumerate(ratios):
        _, counts = setting.counts(r)
        idx, _ = sample_mixture(jax.random.fold_in(key, i), w, dom,
                                jnp.asarray(counts, jnp.int32), budget=cfg.budget,
                                n_domains=setting.n_domains, replace=cfg.replace)
        out.append(np.asarray(idx))
    return np.stack(out)


def domain_losses(setting, loras) -> np.ndarray:
    """Each adapter's mean answer loss on each domain's own validation rows: ``[k, n_domains]``."""
    from duet_jax.train.evaluate import row_scores

    vpool, vdom = setting.validation_pool()
    nll, cnt, _ = row_scores(setting.graphdef, loras, setting.frozen, vpool, start=setting.start)
    nll, cnt = np.atleast_2d(np.asarray(nll, np.float64)), np.atleast_2d(np.asarray(cnt, np.float64))
    out = np.zeros((nll.shape[0], setting.n_domains))
    for d in range(setting.n_domains):
        m = vdom == d
        out[:, d] = nll[:, m].sum(1) / np.maximum(cnt[:, m].sum(1), 1.0)
    return out


def _train(setting, indices: np.ndarray, key):
    """Proxy fine-tunes (``[R, M]`` mixtures at once), with the run's training settings."""
    from duet_jax.train import finetune_many

    return finetune_many(setting.graphdef, setting.lora0, setting.frozen, setting.pool,
                         jnp.asarray(indices, jnp.int32), jax.random.split(key, indices.shape[0]),
                         setting.config.train, start=setting.start)


# ------------------------------------------------------------------------------------ RegMix
def _features(r: np.ndarray) -> np.ndarray:
    n = r.shape[1]
    pairs = [r[:, i] * r[:, j] for i, j in itertools.combinations_with_replacement(range(n), 2)]
    return np.concatenate([np.ones((r.shape[0], 1)), r, np.stack(pairs, 1)], 1)


def regmix(setting, config: BaselineConfig, key) -> tuple[np.ndarray, dict]:
    n = setting.n_domains
    rng = np.random.default_rng(int(np.asarray(jax.random.randint(key, (), 0, 2**31 - 1))))
    ratios = rng.dirichlet(np.ones(n), config.proxy_runs)
    k_mix, k_train = jax.random.split(key)
    idx = _mixtures(setting, ratios, k_mix)
    res = _train(setting, idx, k_train)
    y = domain_losses(setting, res.lora).mean(1)  # lower is better
    X = _features(ratios)
    w = np.linalg.solve(X.T @ X + config.regmix_ridge * np.eye(X.shape[1]), X.T @ y)
    cand = rng.dirichlet(np.ones(n), config.regmix_candidates)
    pred = _features(cand) @ w
    top = cand[np.argsort(pred)[: config.regmix_top]]
    ratio = top.mean(0)
    return ratio / ratio.sum(), {
        "proxy_finetunes": int(config.proxy_runs),
        "proxy_ratios": ratios.tolist(), "proxy_validation_loss": y.tolist(),
        "fit_r2": float(1 - np.sum((X @ w - y) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)),
    }


# ------------------------------------------------------------------------------------ Aioli
def aioli(setting, config: BaselineConfig, key) -> tuple[np.ndarray, dict]:
    n = setting.n_domains
    p = np.full(n, 1.0 / n)
    trace, eps = [p.tolist()], config.aioli_epsilon
    for t in range(config.aioli_rounds):
        kt = jax.random.fold_in(key, t)
        k_mix, k_train = jax.random.split(kt)
        probes = (1 - eps) * p[None] + eps * np.eye(n)
        res = _train(setting, _mixtures(setting, probes, k_mix), k_train)
        L = domain_losses(setting, res.lora)  # [probe j, domain i]
        gain = -(L - L.mean(0, keepdims=True)).sum(1)  # leaning towards j lowers the total by this
        scale = np.abs(gain).max()
        p = p * np.exp(config.aioli_eta * gain / scale) if scale > 0 else p
        p = p / p.sum()
        trace.append(p.tolist())
    return p, {"proxy_finetunes": int(config.aioli_rounds * n), "ratio_trace": trace}


# ------------------------------------------------------------------------------------ DoReMi
def _row_loss(graphdef, lora, frozen, batch, start):
    from duet_jax.train.forward import slot_logprobs

    lp = slot_logprobs(graphdef, lora, frozen, batch, start=start)
    m = batch.loss_mask
    return -jnp.sum(lp * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0), jnp.sum(m, -1) > 0


@functools.partial(jax.jit, static_argnames=("graphdef", "train_config", "steps", "start", "n_domains",
                                             "eta", "smoothing"))
def _doremi_jit(graphdef, lora0, frozen, pool, domain_of, row_prob, ref_loss, key, *, train_config, steps,
                start, n_domains, eta, smoothing):
    from duet_jax.train.trainer import make_optimizer

    B = train_config.batch_size * train_config.grad_accum
    tx = make_optimizer(train_config, steps)
    u = jnp.full((n_domains,), 1.0 / n_domains)

    def step(carry, k):
        lora, opt, alpha = carry
        rows = jax.random.choice(k, domain_of.shape[0], (B,), p=row_prob)
        batch = pool.take(rows)
        d = domain_of[rows]
        onehot = jax.nn.one_hot(d, n_domains)  # [B, n]

        loss_rows, has = _row_loss(graphdef, lora, frozen, batch, start)
        excess = jnp.maximum(loss_rows - ref_loss[rows], 0.0) * has
        per = (onehot * excess[:, None]).sum(0) / jnp.maximum((onehot * has[:, None]).sum(0), 1.0)
        a = alpha * jnp.exp(eta * per)
        a = (1 - smoothing) * a / a.sum() + smoothing * u

        def weighted(lo):
            lr, h = _row_loss(graphdef, lo, frozen, batch, start)
            cnt = jnp.maximum((onehot * h[:, None]).sum(0), 1.0)
            per_d = (onehot * (lr * h)[:, None]).sum(0) / cnt
            return jnp.sum(jax.lax.stop_gradient(a) * per_d)

        loss, g = jax.value_and_grad(weighted)(lora)
        updates, opt = tx.update(g, opt, lora)
        return (optax.apply_updates(lora, updates), opt, a), (a, loss)

    init = (lora0, tx.init(lora0), u)
    _, (alphas, losses) = jax.lax.scan(step, init, jax.random.split(key, steps))
    return alphas, losses


def doremi(setting, config: BaselineConfig, key) -> tuple[np.ndarray, dict]:
    from duet_jax.train.evaluate import row_scores
    from duet_jax.train.trainer import num_steps

    cfg = setting.config
    n = setting.n_domains
    k_ref, k_mix, k_dro = jax.random.split(key, 3)
    ref = _train(setting, _mixtures(setting, np.full((1, n), 1.0 / n), k_mix), k_ref)
    nll, cnt, _ = row_scores(setting.graphdef, jax.tree.map(lambda a: a[0], ref.lora), setting.frozen,
                             setting.pool, start=setting.start)
    ref_loss = jnp.asarray(np.asarray(nll) / np.maximum(np.asarray(cnt), 1.0), jnp.float32)
    sizes = setting.available.astype(np.float64)
    row_prob = jnp.asarray(1.0 / (n * sizes[setting.domain_of]), jnp.float32)  # uniform over domains
    steps = config.doremi_steps or num_steps(cfg.train, cfg.budget)
    alphas, losses = _doremi_jit(setting.graphdef, setting.lora0, setting.frozen, setting.pool,
                                 setting.domain_of_device(), row_prob, ref_loss, k_dro,
                                 train_config=cfg.train, steps=int(steps), start=int(setting.start),
                                 n_domains=n, eta=float(config.doremi_eta),
                                 smoothing=float(config.doremi_smoothing))
    alphas, losses = np.asarray(alphas, np.float64), np.asarray(losses)
    if not np.isfinite(alphas).all() or not np.isfinite(losses).all():
        raise ConfigError("doremi: the proxy's DRO training gave a non-finite loss; lower "
                          "train.learning_rate or baselines.doremi_eta")
    ratio = alphas.mean(0)
    return ratio / ratio.sum(), {"proxy_finetunes": 2, "dro_steps": int(steps),
                                 "final_domain_weights": alphas[-1].tolist()}


PROXIES = {"doremi": doremi, "regmix": regmix, "aioli": aioli}


def run_proxy(name: str, setting, config: BaselineConfig, key) -> tuple[np.ndarray, dict]:
    """The ratio a proxy-based baseline finds, and its diagnostics (``proxy_finetunes`` among
    them)."""
    if name not in PROXIES:
        raise ConfigError(f"unknown proxy method {name!r}; available: {', '.join(PROXIES)}")
    ratio, info = PROXIES[name](setting, config, key)
    return np.asarray(ratio, np.float64), info
