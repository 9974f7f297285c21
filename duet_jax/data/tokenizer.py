"""Load a tokenizer from a model SPEC: a built-in name, a ``.gguf`` file, a local Hugging Face
directory, or a hub name.

The GGUF route rebuilds a Hugging Face fast tokenizer from the file's metadata (``tokenizer.ggml.*``:
the BPE vocabulary, merges, token types, special ids, and ``tokenizer.chat_template``), so the
offline SmolLM2 GGUF needs no ``tokenizer.json``. The rebuilt ``tokenizer.json`` is cached under
:func:`duet_jax.assets.cache_dir` (reading the GGUF metadata takes seconds; the cache milliseconds).

Supported GGUF tokenizer models: ``gpt2`` (byte-level BPE) with the pre-tokenizers ``smollm``,
``default``/``gpt2``, ``llama-bpe``, and ``qwen2`` (approximations documented in ``_PRETOKENIZERS``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from duet_jax import assets
from duet_jax.errors import OfflineError, TokenizerError

__all__ = [
    "BUILTIN_MODELS",
    "load_tokenizer",
    "tokenizer_from_gguf",
    "is_offline",
    "resolve_builtin",
]

#: Built-in model names -> a function giving the local file.
BUILTIN_MODELS = {"smollm2-135m-instruct": assets.smollm2_gguf_path}

# GPT-2 style byte-level split regex (what `ByteLevel(use_regex=True)` applies).
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama-3 / qwen2 style regex (numbers in groups of at most 3).
_LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRETOKENIZERS = {
    # SmolLM: every digit on its own, then GPT-2 byte-level splitting (no prefix space).
    "smollm": ("digits", _GPT2_REGEX),
    "default": (None, _GPT2_REGEX),
    "gpt2": (None, _GPT2_REGEX),
    "llama-bpe": (None, _LLAMA3_REGEX),
    "qwen2": (None, _QWEN2_REGEX),
}


def is_offline() -> bool:
    """True when the Hugging Face offline switches are set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_builtin(spec: str) -> Path | None:
    """The local file of a built-in model name, or None when ``spec`` is not a built-in name."""
    fn = BUILTIN_MODELS.get(spec.strip().lower())
    return fn() if fn is not None else None


def load_tokenizer(spec: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` for a model SPEC.

    Args:
      spec: ``"smollm2-135m-instruct"`` (built in), a path to a ``.gguf`` file, a local directory
        holding a Hugging Face tokenizer, or a hub name such as ``"Qwen/Qwen2.5-0.5B-Instruct"``.

    Raises:
      TokenizerError: the tokenizer cannot be built or loaded (the message says why).
      OfflineError: ``spec`` is a hub name and the process is offline.
    """
    text = os.fspath(spec)
    builtin = resolve_builtin(text)
    if builtin is not None:
        return tokenizer_from_gguf(builtin)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise TokenizerError(f"GGUF file not found: {path}")
        return tokenizer_from_gguf(path)
    if path.is_dir():
        return _from_directory(path)
    if path.exists():
        raise TokenizerError(
            f"cannot load a tokenizer from the file {path}: expected a .gguf file, a directory with "
            "a Hugging Face tokenizer, a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS))}) or a hub name"
        )
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise TokenizerError(f"no such file or directory: {path}")
    # A hub name.
    if is_offline():
        raise OfflineError(
            f"{text!r} is not a built-in name, a .gguf file or a local directory, so it would be "
            "downloaded from the Hugging Face hub, but the process is offline (HF_HUB_OFFLINE=1). "
            f"Use a local directory or .gguf file, or a built-in name: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    return _from_pretrained(text, local=False)


#: files a Hugging Face tokenizer can be loaded from (one is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _from_directory(path: Path):
    """A local directory, resolved like :func:`duet_jax.models.resolve_spec` resolves a model
    directory: Hugging Face files first, else its single ``.gguf``; otherwise say what is missing
    (not transformers' hint about sentencepiece)."""
    has_config = (path / "config.json").is_file()
    tok_files = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if tok_files:
        return _from_pretrained(str(path), local=True)
    ggufs = sorted(path.glob("*.gguf"))
    if not has_config and len(ggufs) == 1:
        return tokenizer_from_gguf(ggufs[0])
    if not has_config:
        what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no .gguf file"
        raise TokenizerError(
            f"directory {path} has no config.json and {what}: it is not a model directory (a Hugging "
            "Face model directory holds config.json, model.safetensors and tokenizer.json)")
    raise TokenizerError(
        f"directory {path} has config.json but no tokenizer file ({', '.join(TOKENIZER_FILES)}); "
        "copy the model's tokenizer files into it")


def _from_pretrained(name: str, *, local: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        where = "local directory" if local else "hub name"
        raise TokenizerError(f"cannot load a tokenizer from the {where} {name!r}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{name!r} gave a slow tokenizer; duet-jax needs a fast one")
    return tok


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|v1"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def tokenizer_from_gguf(path: str | os.PathLike):
    """Rebuild the fast tokenizer stored in a GGUF file's metadata (cached as tokenizer.json).

    Raises:
      TokenizerError: the file has no tokenizer, or one of an unsupported kind.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    cache = assets.cache_dir() / "tokenizers" / _file_key(path)
    tok_file, meta_file = cache / "tokenizer.json", cache / "meta.json"
    if not (tok_file.is_file() and meta_file.is_file()):
        backend, meta = _build_from_gguf(path)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = tok_file.with_suffix(".tmp")
        backend.save(str(tmp))
        os.replace(tmp, tok_file)
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_file)
    meta = json.loads(meta_file.read_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_file),
        bos_token=meta["bos_token"],
        eos_token=meta["eos_token"],
        unk_token=meta["unk_token"],
        pad_token=meta["pad_token"],
        clean_up_tokenization_spaces=False,
    )
    if meta.get("chat_template"):
        tok.chat_template = meta["chat_template"]
    tok.init_kwargs["gguf_file"] = str(path)
    return tok


def _build_from_gguf(path: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:
        from duet_jax.models.gguf import check_gguf_size

        check_gguf_size(path, TokenizerError)  # a truncated file says so
        raise TokenizerError(f"cannot read GGUF file {path}: {e}") from e

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{path} has no tokenizer in its metadata (no tokenizer.ggml.model)")
    if model != "gpt2":
        raise TokenizerError(
            f"{path}: GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in _PRETOKENIZERS:
        raise TokenizerError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_PRETOKENIZERS)}"
        )
    tokens = list(field("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    digits, regex = _PRETOKENIZERS[pre]
    steps = []
    if digits == "digits":
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex == _GPT2_REGEX:  # ByteLevel's own regex is exactly GPT-2's
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # Token type 3 = control (special), 4 = user-defined: both are matched whole, never split.
    specials = [tokens[i] for i, t in enumerate(types) if int(t) in (3, 4)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def tok_name(key, fallback):
        i = field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else fallback

    eos = tok_name("tokenizer.ggml.eos_token_id", tokens[0])
    meta = {
        "bos_token": tok_name("tokenizer.ggml.bos_token_id", None),
        "eos_token": eos,
        "unk_token": tok_name("tokenizer.ggml.unknown_token_id", None),
        "pad_token": tok_name("tokenizer.ggml.padding_token_id", eos),
        "chat_template": field("tokenizer.chat_template"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "source": str(path),
        "pre": pre,
    }
    return backend, meta
