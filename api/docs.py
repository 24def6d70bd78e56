"""``/docs``: Swagger UI served from a Python package (``fastapi-swagger``), never from a CDN.

FastAPI's default page loads Swagger UI's script and style from jsDelivr, so on a site
without internet (the usual hospital or bank network) ``/docs`` is blank. Here the same page
points at the copy of Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes) that the
``fastapi-swagger`` wheel ships, mounted under ``/docs/static``; the
favicon is an empty data URI, so the page makes no request to any other host. ReDoc (also
CDN-only) is not served.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = "/docs/static"


def install(app: FastAPI) -> None:
    """Serve ``/docs`` (and its OAuth2 redirect page) with local assets; the app must be
    built with ``docs_url=None`` and ``redoc_url=None``."""
    assets = files("fastapi_swagger") / "resources"
    app.mount(STATIC, StaticFiles(directory=str(assets)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url="data:,",
            oauth2_redirect_url="/docs/oauth2-redirect",
            # "Authorize" keeps the tokens across reloads of the page.
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
