"""``duet-jax generate``: continue a prompt with a model (greedy or sampled, KV cache, jitted).

SPEC (``--model``) is a built-in name (``smollm2-135m-instruct``), a local Hugging Face directory,
a ``.gguf`` file, or a hub name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "generate text with a model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", metavar="SPEC",
                        help="built-in name, local HF directory, .gguf file or hub name "
                             "(default: %(default)s)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) decodes greedily; > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template as a user turn")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    import jax

    from duet_jax.data.tokenizer import load_tokenizer
    from duet_jax.errors import ConfigError
    from duet_jax.models import generate, load_model

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    t_load = time.perf_counter() - t0
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"--chat: the tokenizer of {args.model!r} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(args.prompt).input_ids
    stops = set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        stops.add(int(tok.eos_token_id))
    t1 = time.perf_counter()
    out = generate(model, [ids], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, key=jax.random.key(args.seed),
                   stop_tokens=sorted(stops))
    t_gen = time.perf_counter() - t1
    new = out.tokens[0]
    completion = tok.decode(new, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "model": args.model,
            "prompt": args.prompt,
            "completion": completion,
            "prompt_tokens": len(ids),
            "new_tokens": len(new),
            "token_ids": new,
            "finish_reason": out.finish_reasons[0],
            "temperature": args.temperature,
            "load_seconds": round(t_load, 3),
            "generate_seconds": round(t_gen, 3),
        }))
    else:
        sys.stdout.write(completion + "\n")
    return 0
