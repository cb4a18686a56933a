"""Cluster deployment: the Serve config generator (build_config) and the KubeRay manifest."""
