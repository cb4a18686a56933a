"""`serve deploy` of the generated config onto a running `ray start --head`: generate, then tear down.

The cluster is started with none of the service's variables; only the config carries them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import yaml

from settings import REPO_ROOT
from testing.http import free_port, get_json
from testing.polling import wait_for
from tests.raycluster import SERVE, RayHead, clean_env, run_cli


def test_serve_deploy_runs_the_exported_settings(tmp_path: Path, tiny_causal: Path) -> None:
    http_port = free_port()
    exported = {
        "MODEL_ID": str(tiny_causal),
        "MAX_REPLICAS": "1",
        "MAX_NEW_TOKENS": "5",
        "TEMPERATURE": "0",
        "TOP_K": "7",
        "MAX_PROMPT_TOKENS": "12",
        "HOST": "127.0.0.1",
        "PORT": str(http_port),
    }
    config = tmp_path / "serve_config.yaml"
    run_cli([sys.executable, "-m", "deploy.build_config", "-o", str(config)], {**clean_env(), **exported})
    assert yaml.safe_load(config.read_text())["http_options"] == {"host": "127.0.0.1", "port": http_port}

    # The image puts the code on PYTHONPATH for every Ray process; a local cluster needs the same.
    with RayHead(free_port(), dashboard_port=free_port(), env={"PYTHONPATH": str(REPO_ROOT)}) as head:
        cli_env = head.client_env()  # none of the service's variables
        run_cli([SERVE, "deploy", str(config), "--address", head.dashboard_url], cli_env)

        url = f"http://127.0.0.1:{http_port}"
        health = wait_for(lambda: get_json(f"{url}/healthz"), timeout=120, what="the deployed Gateway")
        (model,) = health["models"]
        assert model["root"] == str(tiny_causal)
        assert model["replicas"]["max"] == 1
        assert model["state"] == "scaled_to_zero"

        response = httpx.post(f"{url}/generate", json={"prompts": ["Return the", "Raise"]}, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == tiny_causal.name and len(body["completions"]) == 2
        assert body["generation_kwargs"]["max_new_tokens"] == 5 and body["generation_kwargs"]["top_k"] == 7
        assert body["generation_kwargs"]["temperature"] == 0.0
        assert body["usage"]["completion_tokens"] <= 10
        # MAX_PROMPT_TOKENS is enforced inside the model replica: the ModelServer got the settings too.
        long_prompt = httpx.post(f"{url}/generate", json={"prompt": "Return the number " * 10}, timeout=120)
        assert long_prompt.status_code == 413, long_prompt.text
        assert "at most 12 (MAX_PROMPT_TOKENS)" in long_prompt.json()["error"]["message"]

        status = run_cli([SERVE, "status", "--address", head.dashboard_url], cli_env).stdout
        assert yaml.safe_load(status)["applications"]["llm"]["status"] == "RUNNING"

        run_cli([SERVE, "shutdown", "--yes", "--address", head.dashboard_url], cli_env)
        wait_for(lambda: get_json(f"{url}/healthz") is None, timeout=60, what="Serve to stop answering")
