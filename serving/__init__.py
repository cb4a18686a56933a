"""The two Ray Serve deployments (Gateway and Generator) and the HTTP API they serve."""
