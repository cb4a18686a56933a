"""The playground page: ``GET /`` and ``/static/...``, answered by the Gateway from files in ``serving/static``.

Serving the page reads files only, so loading it never wakes a model. The page itself talks to the API with
relative URLs, which keeps it working when the application sits under a route prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The page holds an API key in the tab: allow nothing but this origin to run, load or receive anything,
# and no other site to frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount_page(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``/static`` (its script and style sheet) to ``app``.

    >>> from fastapi import FastAPI
    >>> from fastapi.testclient import TestClient
    >>> app = FastAPI()
    >>> mount_page(app)
    >>> client = TestClient(app)
    >>> client.get("/").headers["content-type"]
    'text/html; charset=utf-8'
    >>> client.get("/static/app.js").status_code
    200
    """
    if not (STATIC_DIR / "index.html").is_file():
        raise RuntimeError(f"the playground page is missing: {STATIC_DIR / 'index.html'} does not exist")
    # no-cache: the browser revalidates (ETag) so a new version of the page is never mixed with an old script.
    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        # Under a route prefix, `/prefix` would resolve the page's relative URLs against `/`: add the slash.
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.replace(path=request.url.path + "/"), status_code=307)
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class _RevalidatedStaticFiles(StaticFiles):
    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
