"""The data DUET mixes: domains, disjoint splits, tokenization into fixed-shape arrays.

    from duet_jax.data import get_domain, SplitSpec, load_tokenizer, encode_examples
    splits = get_domain("sciq").splits(SplitSpec(validation=0.1, evaluation=0.2))
    tok = load_tokenizer("smollm2-135m-instruct")
    train = encode_examples(splits.train, tok)      # TokenizedSplit: int32 arrays + loss mask
"""

from duet_jax.data.domain import Domain, builtin_names, get_domain, get_domains
from duet_jax.data.encode import Bucket, EncodeConfig, TokenizedSplit, encode_examples
from duet_jax.data.example import KINDS, Example
from duet_jax.data.sources import FieldMapping
from duet_jax.data.splits import SPLITS, Splits, SplitSpec, split_examples
from duet_jax.data.tokenizer import load_tokenizer, tokenizer_from_gguf

__all__ = [
    "KINDS", "SPLITS", "Bucket", "Domain", "EncodeConfig", "Example", "FieldMapping", "SplitSpec",
    "Splits", "TokenizedSplit", "builtin_names", "encode_examples", "get_domain", "get_domains",
    "load_tokenizer", "split_examples", "tokenizer_from_gguf",
]
