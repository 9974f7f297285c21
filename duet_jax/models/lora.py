"""LoRA for the Llama-family decoder: ``y = x W + (alpha / r) * dropout(x) A B``.

* ``A`` is ``[in, r]`` (uniform in ``+-1/sqrt(in)``, PEFT's default), ``B`` is ``[r, out]`` and starts
  at zero, so a fresh adapter leaves the model unchanged.
* Both are :class:`LoRAParam`, their own NNX variable type: ``nnx.state(model, LoRAParam)`` is the
  adapter, ``nnx.Optimizer(model, tx, wrt=LoRAParam)`` trains only it, and :data:`FROZEN` selects
  every other parameter.
* Targets are any of ``q, k, v, o, gate, up, down`` (PEFT names ``q_proj`` ... also accepted); the
  layer range is all layers or the last ``L``.
* Dropout is functional: it is active only when the forward gets a ``dropout_key``.
* ``merge_lora`` folds the adapters into the base kernels; ``save_peft`` / ``load_peft`` write and
  read PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), which PEFT and vLLM
  load directly.

Example::

    >>> from flax import nnx
    >>> from duet_jax.models import LlamaModel, ModelConfig, LoRAConfig, add_lora, LoRAParam
    >>> model = LlamaModel(ModelConfig.preset("tiny-llama"), rngs=nnx.Rngs(0))
    >>> add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v"), last_layers=1),
    ...          rngs=nnx.Rngs(1))
    >>> sorted(len(x) for x in nnx.state(model, LoRAParam).flat_state().paths)
    [6, 6, 6, 6]
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duet_jax.errors import ModelError
from duet_jax.models.llama import ATTENTION_TARGETS, MLP_TARGETS, Linear, LlamaModel

__all__ = [
    "LoRAParam",
    "FROZEN",
    "LoRA",
    "LoRAView",
    "LoRAConfig",
    "TARGETS",
    "add_lora",
    "merge_lora",
    "remove_lora",
    "lora_layers",
    "save_peft",
    "load_peft",
    "peft_state_dict",
]

TARGETS = ATTENTION_TARGETS + MLP_TARGETS
# short name -> PEFT / HF module name and its parent
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_ALIASES = {**{t: t for t in TARGETS}, **{v.split(".")[1]: k for k, v in PEFT_NAMES.items()}}
_PEFT_PREFIX = "base_model.model.model.layers."
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])(?:\.default)?\.weight$")


class LoRAParam(nnx.LoRAParam):
    """duet-jax's LoRA parameter type (a subclass of ``nnx.LoRAParam``, itself an ``nnx.Param``)."""


#: every parameter except the LoRA ones (the frozen base model)
FROZEN = nnx.All(nnx.Param, nnx.Not(LoRAParam))


class LoRA(nnx.Module):
    """``scale * dropout(x) @ lora_a @ lora_b``; ``lora_a [in, r]``, ``lora_b [r, out]``."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, keys=None):
        bound = 1.0 / math.sqrt(in_features)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)

        def draw(k):
            return jax.random.uniform(k, (in_features, rank), jnp.float32, -bound, bound)

        if keys is None:  # one adapter: A [in, r], B [r, out]
            a = draw(rngs.params())
            b_shape = (rank, out_features)
        else:  # one adapter per layer of a stack: A [L, in, r], B [L, r, out]
            a = jnp.stack([draw(k) for k in keys])
            b_shape = (len(keys), rank, out_features)
        self.lora_a = LoRAParam(a.astype(param_dtype))
        self.lora_b = LoRAParam(jnp.zeros(b_shape, param_dtype))

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        if dropout_key is not None and self.dropout > 0:
            keep = 1.0 - self.dropout
            m = jax.random.bernoulli(dropout_key, keep, x.shape)
            x = jnp.where(m, x / keep, 0).astype(x.dtype)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        return (x @ a @ b) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """The ``[in, out]`` update that merging adds to the kernel (float32; ``[L, in, out]`` for a
        stack)."""
        return self.scale * jnp.matmul(self.lora_a[...].astype(jnp.float32),
                                       self.lora_b[...].astype(jnp.float32))


class _LayerSlot:
    """One layer's slice of a stacked LoRA variable: ``slot[...]`` reads it, ``slot[...] = x``
    writes it back into the stack."""

    def __init__(self, var, index: int):
        self.var, self.index = var, index

    def __getitem__(self, item):
        return self.var[...][self.index][item]

    def __setitem__(self, item, x):
        full = self.var[...]
        self.var[...] = full.at[self.index].set(full[self.index].at[item].set(x))

    @property
    def value(self):
        return self[...]

    @property
    def shape(self):
        return tuple(self.var.shape[1:])

    @property
    def dtype(self):
        return self.var[...].dtype


class LoRAView:
    """One layer's adapter inside a stacked :class:`LoRA`: ``rank``, ``alpha``, ``dropout``,
    ``scale``, and that layer's ``lora_a`` ``[in, r]`` / ``lora_b`` ``[r, out]`` (``[...]`` reads,
    ``[...] = x`` writes into the stack)."""

    def __init__(self, lora: LoRA, index: int):
        self.module, self.index = lora, index
        self.rank, self.alpha, self.dropout, self.scale = lora.rank, lora.alpha, lora.dropout, lora.scale
        self.lora_a = _LayerSlot(lora.lora_a, index)
        self.lora_b = _LayerSlot(lora.lora_b, index)

    def delta(self) -> jax.Array:
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which projections get an adapter, and its hyperparameters.

    Attributes:
      rank: ``r``.
      alpha: scale numerator: the update is ``alpha / r * x A B`` (``alpha / sqrt(r)`` with rsLoRA).
      dropout: dropout rate on the adapter's input (training only: needs a ``dropout_key``).
      targets: any of ``q, k, v, o, gate, up, down`` (or PEFT's ``q_proj`` ...).
      last_layers: ``None`` for every layer, else only the last ``L`` layers.
      layers: explicit layer indices (overrides ``last_layers``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    last_layers: int | None = None
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False

    def __post_init__(self):
        if int(self.rank) <= 0:
            raise ModelError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise ModelError("LoRA needs at least one target module")
        bad = [t for t in targets if t not in _ALIASES]
        if bad:
            raise ModelError(
                f"LoRA target(s) {bad} not in the model; it has: {', '.join(TARGETS)} "
                f"(or PEFT names {', '.join(v.split('.')[1] for v in PEFT_NAMES.values())})")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(_ALIASES[t] for t in targets)))
        if self.last_layers is not None and int(self.last_layers) <= 0:
            raise ModelError(f"last_layers must be positive, got {self.last_layers}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ModelError(f"LoRA layers {bad} outside the model's {num_layers} layers")
            return self.layers
        if self.last_layers is None:
            return tuple(range(num_layers))
        if self.last_layers > num_layers:
            raise ModelError(f"last_layers={self.last_layers} but the model has {num_layers} layers")
        return tuple(range(num_layers - self.last_layers, num_layers))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _linears(model: LlamaModel, layer: int) -> tuple[dict[str, Linear], int]:
    """The (stacked) projections of the stack holding ``layer`` and the layer's offset in it."""
    return model.layer_linears(layer)


def add_lora(model: LlamaModel, config: LoRAConfig, *, rngs: nnx.Rngs,
             param_dtype=jnp.float32) -> LlamaModel:
    """Attach adapters (in place) to ``config.targets`` in ``config``'s layers; returns ``model``.

    The model's layer stacks are split where the adapted layers begin and end (LoRA on the last L
    layers: a frozen stack, then an adapted stack whose adapters are stacked ``[L, in, r]``).

    Raises:
      ModelError: a target the model lacks, a layer outside the model, or a projection that already
        has an adapter.
    """
    pairs = [(i, t) for i in config.layer_indices(model.num_layers) for t in config.targets]
    _attach(model, pairs, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
            use_rslora=config.use_rslora, rngs=rngs, param_dtype=param_dtype)
    return model


def _attach(model, pairs, *, rank, alpha, dropout, use_rslora, rngs, param_dtype):
    for i, t in pairs:
        lin = _linears(model, i)[0].get(t)
        if lin is None:
            raise ModelError(f"layer {i} has no projection {t!r}; it has {', '.join(TARGETS)}")
        if lin.lora is not None:
            raise ModelError(f"layer {i} projection {t!r} already has a LoRA adapter")
    keys = {p: rngs.params() for p in pairs}  # drawn in pair order: the values do not depend on stacking
    new: dict[int, tuple[str, ...]] = {}
    for i, t in pairs:
        new[i] = (*new.get(i, ()), t)
    sig = [tuple(sorted(new.get(i, ()))) for i in range(model.num_layers)]
    model.split_stacks(i for i in range(1, model.num_layers) if sig[i] != sig[i - 1])
    for st in model.stacks:
        targets = sig[st.first]
        lins = st.layer.linears()
        for t in targets:
            lin = lins[t]
            lin.lora = LoRA(lin.in_features, lin.out_features, rank=rank, alpha=alpha,
                            dropout=dropout, use_rslora=use_rslora, param_dtype=param_dtype,
                            keys=[keys[(i, t)] for i in range(st.first, st.stop)])
    model.join_stacks()


def lora_layers(model: LlamaModel) -> dict[tuple[int, str], LoRAView]:
    """Every adapter, keyed by (layer, target): a :class:`LoRAView` of that layer's slice."""
    out = {}
    for st in model.stacks:
        for t, lin in st.layer.linears().items():
            if lin.lora is not None:
                for j in range(st.count):
                    out[(st.first + j, t)] = LoRAView(lin.lora, j)
    return dict(sorted(out.items()))


def merge_lora(model: LlamaModel) -> LlamaModel:
    """Fold every adapter into its kernel (``W += scale * A B``) and remove it; in place."""
    for st in model.stacks:
        for lin in st.layer.linears().values():
            if lin.lora is not None:
                k = lin.kernel[...]
                lin.kernel[...] = (k.astype(jnp.float32) + lin.lora.delta()).astype(k.dtype)
                lin.lora = None
    model.join_stacks()
    return model


def remove_lora(model: LlamaModel) -> LlamaModel:
    """Drop every adapter without merging; in place."""
    for st in model.stacks:
        for lin in st.layer.linears().values():
            lin.lora = None
    model.join_stacks()
    return model


# ---------------------------------------------------------------------------------------- PEFT
def peft_state_dict(model: LlamaModel) -> dict[str, np.ndarray]:
    """Adapters under PEFT's key names and layouts: ``lora_A.weight [r, in]``,
    ``lora_B.weight [out, r]`` (float32)."""
    out = {}
    for (i, t), lora in lora_layers(model).items():
        base = f"{_PEFT_PREFIX}{i}.{PEFT_NAMES[t]}"
        out[f"{base}.lora_A.weight"] = np.asarray(lora.lora_a[...], np.float32).T.copy()
        out[f"{base}.lora_B.weight"] = np.asarray(lora.lora_b[...], np.float32).T.copy()
    return out


def save_peft(model: LlamaModel, directory: str | Path, *,
              base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA format).

    All adapters must share rank, alpha and dropout (as ``add_lora`` makes them).
    """
    from safetensors.numpy import save_file

    loras = lora_layers(model)
    if not loras:
        raise ModelError("the model has no LoRA adapter to save")
    hyper = {(lo.rank, lo.alpha, lo.dropout, lo.scale) for lo in loras.values()}
    if len(hyper) != 1:
        raise ModelError(f"adapters differ in rank/alpha/dropout {sorted(hyper)}; PEFT needs one setting")
    rank, alpha, dropout, scale = hyper.pop()
    use_rslora = not math.isclose(scale, alpha / rank)
    layers = sorted({i for i, _ in loras})
    targets = [t for t in TARGETS if any(tt == t for _, tt in loras)]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or model.config.name or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": [PEFT_NAMES[t].split(".")[1] for t in targets],
        "layers_to_transform": None if layers == list(range(model.num_layers)) else layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": use_rslora,
        "use_dora": False,
        "revision": None,
    }
    expected = {(i, t) for i in layers for t in targets}
    if expected != set(loras):
        raise ModelError("PEFT's format needs the same targets in every adapted layer; "
                         f"missing {sorted(expected - set(loras))}")
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft_state_dict(model), str(d / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return d


def load_peft(model: LlamaModel, directory: str | Path, *, param_dtype=jnp.float32) -> LlamaModel:
    """Attach the adapter saved in ``directory`` (PEFT's format) to ``model``, in place.

    Raises:
      ModelError: not a LoRA adapter, an unknown key, a tensor of the wrong shape (named, with both
        shapes), or adapters for modules the model lacks. Every problem is reported at once.
    """
    from safetensors import safe_open

    d = Path(directory)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise ModelError(f"{p} not found: a PEFT adapter directory holds adapter_config.json "
                             "and adapter_model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ModelError(f"{cfg_path}: DoRA adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelError(f"{cfg_path}: rank_pattern / alpha_pattern are not supported")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    errors: list[str] = []
    tensors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safe_open(str(w_path), "numpy") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if m is None or m.group(3) not in _ALIASES:
                errors.append(f"unexpected tensor {key!r}")
                continue
            i, t = int(m.group(1)), _ALIASES[m.group(3)]
            tensors.setdefault((i, t), {})[m.group(4)] = f.get_tensor(key)
    pairs = sorted(tensors)
    for i, t in pairs:
        if not 0 <= i < model.num_layers:
            errors.append(f"adapter for layer {i}, but the model has {model.num_layers} layers")
            continue
        lin = _linears(model, i)[0][t]
        base = f"{_PEFT_PREFIX}{i}.{PEFT_NAMES[t]}"
        want = {"A": (rank, lin.in_features), "B": (lin.out_features, rank)}
        for ab in "AB":
            arr = tensors[(i, t)].get(ab)
            if arr is None:
                errors.append(f"missing tensor {base}.lora_{ab}.weight")
            elif tuple(arr.shape) != want[ab]:
                errors.append(f"{base}.lora_{ab}.weight: shape {tuple(arr.shape)} in the file, "
                              f"expected {want[ab]}")
    if errors:
        raise ModelError(f"cannot load the adapter in {d}:\n  " + "\n  ".join(errors))
    _attach(model, pairs, rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
            use_rslora=bool(cfg.get("use_rslora", False)), rngs=nnx.Rngs(0), param_dtype=param_dtype)
    loaded = set(pairs)
    for st in model.stacks:
        for t, lin in st.layer.linears().items():
            if lin.lora is None or (st.first, t) not in loaded:
                continue
            rows = range(st.first, st.stop)
            lin.lora.lora_a[...] = jnp.asarray(
                np.stack([tensors[(i, t)]["A"].T for i in rows]), param_dtype)
            lin.lora.lora_b[...] = jnp.asarray(
                np.stack([tensors[(i, t)]["B"].T for i in rows]), param_dtype)
    return model

