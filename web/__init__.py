"""The browser dashboard: server-rendered pages over the REST API's own documents.

Every page renders what the JSON API returns for the same thing (the page handlers call the
API's route functions and template their results), signs in with the admin token into a
signed session cookie (:mod:`api.auth`), and loads nothing from any host but the server
itself (a strict Content-Security-Policy says so to the browser). Live parts of a page are
fragments that ``static/app.js`` re-fetches while a run is active; charts are SVG drawn on
the server (:mod:`web.charts`), so there is no JavaScript build step and no chart library.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
