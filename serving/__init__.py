"""The three Ray Serve deployments and the HTTP API they serve.

- ``gateway.Gateway`` (ingress, FastAPI from ``app.create_app``): auth, routes, the page; no torch.
- ``pool.controller.PoolController``: the set of models, their priorities, eviction, the daily zero.
- ``model_server.ModelServer``: one application per model, running the engine it is given.

``models`` is the model view they share (config, status, card); ``api`` the dialects and errors.
"""
