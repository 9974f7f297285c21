"""Adapter checkpoints with orbax: the LoRA state, the optimizer state and the step, restored into
the same structure. PEFT export lives in duet_jax.models.lora (``save_peft``)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from duet_jax.errors import ConfigError

__all__ = ["save_checkpoint", "restore_checkpoint"]


def _arrays(tree):
    return jax.tree.map(np.asarray, tree)


def _checkpointer():
    """orbax's checkpointer; with several processes, one whose only active process is this one
    (the run's files are written by process 0 alone, while the others go on with the loop)."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"duet-p{me}"))


def save_checkpoint(directory: str | Path, lora, opt_state=None, *, step: int = 0,
                    metadata: dict | None = None) -> Path:
    """Write ``directory/state`` (orbax) and ``directory/meta.json``; overwrites an existing one."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    tree = {"lora": _arrays(lora), "opt_state": _arrays(opt_state) if opt_state is not None else {},
            "step": np.asarray(step, np.int64)}
    with _checkpointer() as ckpt:
        ckpt.save(directory / "state", tree, force=True)
    (directory / "meta.json").write_text(json.dumps({"step": int(step), **(metadata or {})}, indent=2))
    return directory


def restore_checkpoint(directory: str | Path, lora_like, opt_state_like=None):
    """``(lora, opt_state, step, metadata)`` restored into the structures of the ``*_like`` trees.

    Raises:
      ConfigError: no checkpoint in ``directory``.
    """
    directory = Path(directory).absolute()
    if not (directory / "state").exists():
        raise ConfigError(f"no checkpoint in {directory}")
    target = {"lora": _arrays(lora_like),
              "opt_state": _arrays(opt_state_like) if opt_state_like is not None else {},
              "step": np.asarray(0, np.int64)}
    with _checkpointer() as ckpt:
        tree = ckpt.restore(directory / "state", target)
    meta = json.loads((directory / "meta.json").read_text()) if (directory / "meta.json").exists() else {}
    lora = jax.tree.unflatten(jax.tree.structure(lora_like), jax.tree.leaves(tree["lora"]))
    opt = None
    if opt_state_like is not None:
        opt = jax.tree.unflatten(jax.tree.structure(opt_state_like), jax.tree.leaves(tree["opt_state"]))
    return lora, opt, int(tree["step"]), meta
