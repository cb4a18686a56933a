"""The playground page as files and routes: served without touching a model, offline, relative URLs only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.page import STATIC_DIR, mount_page

SCRIPTS = (
    "app.js",
    "page.js",
    "apikey.js",
    "models.js",
    "sampling.js",
    "transcript.js",
    "status.js",
    "send.js",
    "answer.js",
    "errors.js",
    "sse.js",
    "wake.js",
)
PAGE_FILES = ("index.html", *SCRIPTS, "style.css")


def all_scripts() -> str:
    """Every script of the page, one after another: a rule about the page's requests holds across its modules."""
    return "\n".join((STATIC_DIR / name).read_text() for name in SCRIPTS)


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    mount_page(app)
    return TestClient(app)


def test_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for name, kind in (*((script, "javascript") for script in SCRIPTS), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        assert kind in response.headers["content-type"], (name, response.headers["content-type"])
        assert response.headers["cache-control"] == "no-cache"
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/../page.py").status_code == 404


def test_page_under_a_prefix_redirects_to_the_slash() -> None:
    parent = FastAPI()
    inner = FastAPI()
    mount_page(inner)
    parent.mount("/llm", inner)
    client = TestClient(parent)
    response = client.get("/llm", follow_redirects=False)
    assert response.status_code in (307, 308) and response.headers["location"].endswith("/llm/")
    assert client.get("/llm/").status_code == 200
    assert client.get("/llm/static/app.js").status_code == 200


def test_the_gateway_app_serves_the_page_without_touching_a_model() -> None:
    from serving.app import create_app
    from settings import build_settings

    class NoModel:
        """A backend that fails the test if anything reaches for a model, its state included."""

        def __getattr__(self, name: str):
            raise AssertionError(f"loading the page reached the model backend ({name})")

    client = TestClient(create_app(NoModel(), build_settings({"API_KEY": "page-key-1234"})))  # type: ignore[arg-type]
    # Open with API keys set: the page must load before a person can type one in.
    for path in ("/", "/static/app.js", "/static/sse.js", "/static/style.css"):
        assert client.get(path).status_code == 200, path
    missing = client.get("/static/nothing.js")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.parametrize("name", PAGE_FILES)
def test_page_files_load_nothing_from_elsewhere(name: str) -> None:
    text = (STATIC_DIR / name).read_text()
    # Offline clusters: no CDN, no web fonts, no absolute URLs of any host.
    assert not re.search(r"https?://", text), f"{name} names an absolute URL"
    assert "@import" not in text, f"{name} imports a style sheet"
    if name.endswith(".css"):
        assert "url(" not in text, f"{name} loads a resource (a font or an image)"


def test_page_uses_relative_urls_only() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    for attribute in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert not attribute.startswith("/"), f"index.html refers to {attribute!r} from the root: use a relative URL"
    script = all_scripts()
    routes = re.findall(r"const ROUTES = \{(.*?)\};", script, re.S)
    assert len(routes) == 1, "the page keeps its routes in one ROUTES"
    paths = re.findall(r'"([^"]+)"', routes[0])
    assert sorted(paths) == ["healthz", "v1/chat/completions", "v1/completions", "v1/models"], paths
    fetched = re.findall(r"fetch\(([^,]+),", script)
    assert fetched == ["url(ROUTES.models)", "url(ROUTES.health)", "url(chat ? ROUTES.chat : ROUTES.completions)"]
    assert not re.search(r"""fetch\(\s*["'`]/""", script), "a fetch from the root would break under a route prefix"


def test_api_key_is_kept_in_session_storage_only() -> None:
    script = all_scripts()
    assert "localStorage" not in script
    assert "sessionStorage.setItem(KEY_STORAGE" in script
    assert "location" not in script.replace("document.baseURI", ""), "the page must not put anything in the address"


def test_static_dir_holds_only_the_page() -> None:
    assert sorted(p.name for p in Path(STATIC_DIR).iterdir()) == sorted(PAGE_FILES)
