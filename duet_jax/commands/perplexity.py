"""``duet-jax perplexity``: perplexity of a model on a text file (``exp`` of the mean token NLL).

Long texts are scored in windows of ``--window`` tokens that overlap by one token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "perplexity of a model on a text file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC",
                        help="built-in name, local HF directory, .gguf file or hub name "
                             "(default: %(default)s)")
    parser.add_argument("--text-file", required=True, metavar="FILE", help="UTF-8 text to score")
    parser.add_argument("--window", type=int, default=1024, metavar="N",
                        help="tokens per scoring window (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from duet_jax.data.tokenizer import load_tokenizer
    from duet_jax.errors import ConfigError
    from duet_jax.models import load_model, token_nll

    path = Path(args.text_file)
    if not path.is_file():
        raise ConfigError(f"text file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    if args.window < 2:
        raise ConfigError(f"--window must be >= 2, got {args.window}")
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    ids = tok(text).input_ids
    if len(ids) < 2:
        raise ConfigError(f"{path} has {len(ids)} token(s); perplexity needs at least 2")
    window = min(args.window, model.config.max_position_embeddings)
    nll = token_nll(model, ids, window=window)
    mean = float(np.mean(nll))
    ppl = float(np.exp(mean))
    secs = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": args.model, "text_file": str(path), "tokens": len(ids),
                          "scored_tokens": int(nll.size), "mean_nll": mean, "perplexity": ppl,
                          "window": window, "seconds": round(secs, 3)}))
    else:
        print(f"perplexity {ppl:.4f} ({nll.size} tokens scored, mean NLL {mean:.4f} nats)")
    return 0
