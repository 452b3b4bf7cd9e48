"""Loopback fake of LLM providers' native *batch* HTTP APIs, for testing Sluice's adapters.

Usage::

    from tests.provider_fake import ProviderFake
    with ProviderFake() as fake:
        base = fake.url("openai")          # http://127.0.0.1:PORT/openai/v1
        key = fake.key("openai")           # "fake-openai-key"

or as a process: ``python -m tests.provider_fake --port 0`` prints ``PORT <n>`` once listening.

Deterministic token counts (same formula for every provider):

* ``P`` (prompt) = number of whitespace-separated words in all message text of the request (system,
  user and assistant; Anthropic ``system``; Gemini ``systemInstruction``), at least 1.
* Reply text = ``"echo: " + <last user message text>``; ``O`` = words in the reply = 1 + words(last user text).
* ``C`` (cached) = ``P // 2`` if the user text contains ``CACHE`` else 0.
* ``R`` (reasoning) = 3 if the user text contains ``THINK`` else 0.

Per provider:

* OpenAI/Azure chat: ``prompt_tokens=P, completion_tokens=O+R, total_tokens=P+O+R,
  prompt_tokens_details.cached_tokens=C, completion_tokens_details.reasoning_tokens=R``
  (Groq/Together/Mistral: the first three only). Responses API: ``input_tokens=P, output_tokens=O+R``.
  Embeddings: ``prompt_tokens=total_tokens`` = words of all inputs.
* Anthropic: ``input_tokens=P-C, cache_read_input_tokens=C, cache_creation_input_tokens=0, output_tokens=O+R``.
* Gemini: ``promptTokenCount=P, candidatesTokenCount=O, thoughtsTokenCount=R (omitted if 0),
  cachedContentTokenCount=C (omitted if 0), totalTokenCount=P+O+R``.

See README.md for paths, keys, markers, progression rules and the ``/_fake/`` control plane.
"""

from .server import BASE_PATHS, ProviderFake

__all__ = ["BASE_PATHS", "ProviderFake"]
