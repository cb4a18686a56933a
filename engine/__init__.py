"""Plain-Python text generation engine: no Ray, no HTTP.

Light modules (``params``, ``errors``, ``batcher``) import neither torch nor transformers, so the
HTTP Gateway can use them; ``engine.model`` and ``engine.sampling`` need torch and are imported
only where the model runs.
"""
