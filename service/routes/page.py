"""The web page at ``/`` and the API documentation at ``/docs``, both working with no network.

The page is plain HTML, CSS and JavaScript shipped in the package (``service/static``), with no build step; it uses
nothing but the API every other client uses. FastAPI's own ``/docs`` loads Swagger UI from a CDN, which leaves it
blank on a machine in the field; fastapi-swagger ships the Swagger UI files in its wheel and serves them from the
app itself (FastAPI's documented "self-hosting JavaScript and CSS for docs").
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_swagger import patch_fastapi

STATIC = Path(__file__).resolve().parent.parent / "static"


def install_page_and_docs(app: FastAPI) -> None:
    """Serve the page at ``/`` (its files under ``/static``) and offline Swagger UI at ``/docs``."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    patch_fastapi(app, docs_url="/docs", redirect_from_root_to_docs=False,
                  swagger_ui_parameters={"persistAuthorization": False, "displayRequestDuration": True})
