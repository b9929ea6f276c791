"""GET /rtc-api/docs: Swagger UI 5 rendering the OpenAPI document, served by us (no CDN: it works offline).

Swagger UI comes from the swagger-ui-bundle-v2 package; version 5 renders OpenAPI 3.1
(Swagger UI 4, in swagger-ui-bundle 1.x, refuses 3.1 documents).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from swagger_ui_bundle import swagger_ui_path

from http_bridge.openapi import DOCS_PATH, OPENAPI_PATH
from http_bridge.problems import problem

# The only files served from the package: the page needs no others.
ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>endpoint-broker API</title>
<link rel="stylesheet" href="{DOCS_PATH}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{DOCS_PATH}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "{OPENAPI_PATH}", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""


async def docs_page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def docs_asset(request: Request) -> Response:
    name = request.path_params["asset"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return problem(404, "Not found", f"no docs asset {name!r}")
    return FileResponse(str(swagger_ui_path / name), media_type=media_type,
                        headers={"Cache-Control": "public, max-age=86400"})
