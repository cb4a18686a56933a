"""The HTTP dialects (native ``/generate``, OpenAI ``/v1``): schemas, translation, rendering, errors, auth."""
