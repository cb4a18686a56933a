"""The Grafana dashboard of the service's metrics (``deploy.grafana.dashboard``)."""
