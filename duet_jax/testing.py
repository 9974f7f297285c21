"""Small, fast stand-ins for tests and smoke runs: a tiny byte-level BPE tokenizer (with or without a
ChatML chat template) and a GGUF file that carries only a tokenizer. Nothing here is downloaded."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["CHATML_TEMPLATE", "tiny_tokenizer", "write_gguf_tokenizer"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day. The answer is 18.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


@functools.lru_cache(maxsize=4)
def _backend(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat: bool = True, vocab_size: int = 320):
    """A byte-level BPE tokenizer (every byte encodable) of about ``vocab_size`` tokens.

    Token 0 is ``<|endoftext|>`` (also the pad), 1 ``<|im_start|>``, 2 ``<|im_end|>``. With
    ``chat=True`` it has a ChatML template and ``<|im_end|>`` is the eos; otherwise
    ``<|endoftext|>`` is the eos and there is no template.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend(vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def write_gguf_tokenizer(path: str | Path, *, chat: bool = True, arch: str = "llama") -> Path:
    """Write a GGUF file holding only tokenizer metadata (``tokenizer.ggml.*``) of
    :func:`tiny_tokenizer`, the way llama.cpp's converter stores a byte-level BPE."""
    import json

    import gguf

    path = Path(path)
    model = json.loads(_backend(320))["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2 if chat else 0)
    w.add_pad_token_id(0)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    if chat:
        w.add_chat_template(CHATML_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
