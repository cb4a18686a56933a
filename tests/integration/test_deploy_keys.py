"""API keys reach a cluster through its nodes' environment, never through the generated config.

As on KubeRay (a Secret in the pods' environment): `ray start` runs with API_KEY set, the config is
generated with API_KEY set too and holds no key, and the deployed service requires the key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from settings import REPO_ROOT
from testing.http import free_port, get_json
from testing.polling import wait_for
from tests.raycluster import SERVE, RayHead, clean_env, run_cli

KEY = "sk-node-env-0123456789"


def test_a_deployed_config_gets_its_keys_from_the_nodes_environment(tmp_path: Path, tiny_causal: Path) -> None:
    http_port = free_port()
    exported = {"MODEL_ID": str(tiny_causal), "API_KEY": KEY, "HOST": "127.0.0.1", "PORT": str(http_port)}
    # As on KubeRay: the Gateway and the pool controller (and Serve's import of the graph) only where
    # the node carries this label, the node that has the keys.
    exported["GATEWAY_NODE_LABEL"] = "llm-serve/role=gateway"
    config = tmp_path / "serve_config.yaml"
    run_cli([sys.executable, "-m", "deploy.build_config", "-o", str(config)], {**clean_env(), **exported})
    assert KEY not in config.read_text()

    node_env = {"PYTHONPATH": str(REPO_ROOT), "API_KEY": KEY}  # what the Secret gives the pods
    labelled = ("--labels=llm-serve/role=gateway",)
    with RayHead(free_port(), dashboard_port=free_port(), env=node_env, extra_args=labelled) as head:
        cli_env = head.client_env()  # the CLI has no key: it only sends the config
        run_cli([SERVE, "deploy", str(config), "--address", head.dashboard_url], cli_env)
        url = f"http://127.0.0.1:{http_port}"
        health = wait_for(lambda: get_json(f"{url}/healthz"), timeout=120, what="the deployed Gateway")
        assert health["auth"] == "required"
        refused = httpx.get(f"{url}/v1/models", timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert KEY not in refused.text
        allowed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert allowed.status_code == 200, allowed.text
        assert [m["root"] for m in allowed.json()["data"]] == [str(tiny_causal)]
        status = run_cli([SERVE, "status", "--address", head.dashboard_url], cli_env).stdout
        assert KEY not in status  # nor does Serve show it
        run_cli([SERVE, "shutdown", "--yes", "--address", head.dashboard_url], cli_env)
