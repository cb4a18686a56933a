"""Plain-Python text generation engine: no Ray, no HTTP.

Light modules (``types``, ``errors``, ``work``, ``batcher``, ``detokenize``) import neither torch
nor transformers, so the HTTP Gateway can use them; ``engine.model``, ``engine.continuous`` and
``engine.sampling`` need torch and are imported only where the model runs.
"""
