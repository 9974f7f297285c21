"""Flax NNX Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2), LoRA, loaders (HF
directory, GGUF, hub), KV-cache generation and perplexity.

Example::

    from duet_jax.models import load_model, generate
    model = load_model("smollm2-135m-instruct")
"""

from duet_jax.models.config import PRESETS, SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from duet_jax.models.generation import GenerationOutput, generate
from duet_jax.models.llama import KVCache, LlamaModel, param_count
from duet_jax.models.loaders import (
    BUILTIN_MODELS,
    hf_state_dict,
    load_config,
    load_model,
    resolve_spec,
    save_hf,
)
from duet_jax.models.lora import (
    FROZEN,
    LoRA,
    LoRAConfig,
    LoRAParam,
    add_lora,
    load_peft,
    merge_lora,
    remove_lora,
    save_peft,
)
from duet_jax.models.perplexity import perplexity, token_nll

__all__ = [
    "PRESETS", "SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeScaling",
    "GenerationOutput", "generate",
    "KVCache", "LlamaModel", "param_count",
    "BUILTIN_MODELS", "hf_state_dict", "load_config", "load_model", "resolve_spec", "save_hf",
    "FROZEN", "LoRA", "LoRAConfig", "LoRAParam", "add_lora", "load_peft", "merge_lora",
    "remove_lora", "save_peft",
    "perplexity", "token_nll",
]
