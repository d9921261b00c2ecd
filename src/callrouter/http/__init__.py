"""The REST management API (FastAPI): ``create_app(ApiDeps(...))``. See ``http.api``."""

from callrouter.http.api import create_app
from callrouter.http.deps import ApiDeps

__all__ = ["ApiDeps", "create_app"]
