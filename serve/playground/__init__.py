"""The playground page at `/`: plain HTML, CSS and a little JavaScript, served as files (no build step).

The page holds no data and no secret: it calls the app's native routes (/v1/vectors, /v1/similarity,
/v1/classify, /v1/generate) from the browser with the API key typed into it, so keys apply exactly as for any
client. Its own paths (`PAGE_PATHS`) are therefore open, like /docs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

HERE = Path(__file__).parent
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_PATHS = frozenset({"/", *(f"/playground/{name}" for name in ASSETS)})

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def page(request: Request) -> HTMLResponse:
    """index.html with the app's mount point filled in, so the page works under any Serve route prefix."""
    root = request.scope.get("root_path", "").rstrip("/")
    return HTMLResponse((HERE / "index.html").read_text().replace("%ROOT%", root))


def _asset(name: str, media_type: str):
    def asset() -> Response:
        return Response((HERE / name).read_bytes(), media_type=media_type, headers={"cache-control": "no-cache"})

    asset.__name__ = f"playground_{name.replace('.', '_')}"
    return asset


for _name, _media in ASSETS.items():
    router.add_api_route(f"/playground/{_name}", _asset(_name, _media), methods=["GET"])
