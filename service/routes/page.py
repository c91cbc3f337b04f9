"""The web page at ``/`` and the API documentation at ``/docs``, both working with no network.

The page is plain HTML, CSS and JavaScript shipped in the package (``service/static``), with no build step; it uses
nothing but the API every other client uses. FastAPI's own ``/docs`` loads Swagger UI from a CDN, which leaves it
blank on a machine in the field; here it is served from the Swagger UI files that the fastapi-swagger wheel carries,
as FastAPI documents for self-hosting them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
SWAGGER_UI = Path(str(resources.files("fastapi_swagger") / "resources"))


def install_page_and_docs(app: FastAPI) -> None:
    """Serve the page at ``/`` (its files under ``/static``) and Swagger UI at ``/docs`` (under ``/swagger``)."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=str(app.openapi_url), title=f"{app.title}: API documentation",
                                   swagger_js_url="/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/swagger-ui.css",
                                   swagger_favicon_url="/swagger/favicon-32x32.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/swagger", StaticFiles(directory=SWAGGER_UI), name="swagger")
