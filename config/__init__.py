"""The settings' parts, each in a module of its own; callers import them through ``settings``.

- ``model_fields``: what belongs to one model (the per-model environment variables) and their checks.
- ``model``: ``ModelConfig``, one served model, and the Serve options it builds.
- ``models_file``: ``MODEL_ID`` / ``MODELS`` / ``MODELS_FILE`` into validated ``ModelConfig`` s.
- ``keys``: API keys from ``API_KEY`` and ``API_KEYS_FILE``.
- ``errors``: ``SettingsError`` and error messages that name the variable.
- ``schedule``: ``DailyTime`` (``SCALE_TO_ZERO_AT``).
"""
