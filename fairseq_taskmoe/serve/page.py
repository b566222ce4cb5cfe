"""The web page at `/`: one static, self-contained file (static/index.html: no CDN, no build step),
which talks to the server only through its public API (/languages, /translate, /pairs/SRC-TGT).

Served from the installed package (package data), read once per app.
"""

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def page_html() -> str:
    return resources.files(__package__).joinpath("static").joinpath("index.html").read_text("utf-8")


def add_page(app: FastAPI):
    """Register GET / (the page); kept out of the OpenAPI description, which is the API's."""
    html = page_html()

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})
