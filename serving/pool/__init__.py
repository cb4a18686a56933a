"""The model pool: many models behind one endpoint, each its own Serve application scaling to zero.

- ``spec``: ``ModelSpec`` (one model as the pool sees it), ``PoolSettings``.
- ``logic``: priorities, keep-hot floors, eviction, admission, states (plain Python).
- ``schedule``: SCALE_TO_ZERO_AT as a daily time in a time zone; injectable clocks.
- ``progress``: the cold-start board behind ``waking`` and ``last_cold_start``.
- ``policy``: the Serve autoscaling policy every pool model runs under (inside Serve's controller).
- ``store``: the pool's records in Ray's GCS store.
- ``controller``: the ``PoolController`` deployment; ``admin``: its admin operations.
- ``client``: ``PoolClient``, the Gateway's view; ``reporter``: a model replica's progress reports.
- ``apps``: the service's models as pool models (entry validation, the ModelServer's app factory,
  ``MODEL_APPS``, which the graph hands to the controller).
- ``errors``: what the pool refuses; ``serving.api.errors`` maps each to a status (no HTTP here).

Modules that import Ray Serve or torch are not imported here, so ``serving.pool`` stays light.
"""
