"""The FastAPI application: settings, engine, routes, error handling and the body size limit, wired together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import reid
from service.engine import Engine
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.routes import identify, individuals, system
from service.routes.page import install_page_and_docs
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Re-identify individual sea turtles from photos.

Enrol individuals with a few photos each (no retraining), then identify new photos: the answer ranks enrolled
individuals by their best-matching photo (its similarity, fused with verified local-feature matches when
verification is on), with `new_turtle` where the score is under the threshold. `POST /identify/explain` draws the
matches between a query and an enrolled photo.
Every error is a JSON body `{"error", "message", "field"}`. The web page at `/` does all of this from a browser.
"""


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app; ``engine`` is opened at start-up (lifespan) unless the caller already opened it.

    ``reid serve`` opens the engine before starting the server so that a refusal (wrong model for the store, bad
    checkpoint) ends the command with a one-line error instead of a server traceback.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or Engine.open(settings)
        if settings.api_key is None:
            log.warning("no API key set (--api-key or REID_API_KEY): anyone who can reach %s:%d can enrol and "
                        "delete individuals", settings.host, settings.port)
        try:
            yield
        finally:
            app.state.engine.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: install_page_and_docs serves /docs offline.
    app = FastAPI(title="turtle-reid", version=reid.__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    install_error_handlers(app)
    for module in (individuals, identify, system):
        app.include_router(module.router)
    install_page_and_docs(app)
    return app
