"""What the service tells its operators: metrics through Ray's metrics (``observability.metrics``)."""
