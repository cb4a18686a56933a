"""The two Ray Serve deployments (Gateway and ModelServer) and the HTTP API they serve."""
