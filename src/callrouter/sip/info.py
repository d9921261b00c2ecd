"""What engine was built: read from the ENGINE-INFO file the build script writes.

``scripts/build-engine.sh`` installs ``pjsua2-ENGINE-INFO`` beside ``pjsua2.py``:
NAME=VALUE lines with the source, pjproject version and the compiled limits from
``scripts/engine/config_site.h``. Reading it does not start the engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from callrouter.errors import EngineError


@dataclass(frozen=True)
class EngineInfo:
    module_path: str
    values: dict[str, str]

    @property
    def version(self) -> str:
        return self.values.get("pjproject_version", "unknown")

    @property
    def source(self) -> str:
        return self.values.get("source", "unknown")

    @property
    def source_version(self) -> str:
        return self.values.get("source_version", "unknown")

    @property
    def source_sha256(self) -> str:
        return self.values.get("source_sha256", "unknown")

    @property
    def fallback(self) -> bool:
        """Built from a pjproject older than the supported minimum, on explicit request."""
        return "fallback" in self.values

    @property
    def max_calls(self) -> int:
        return int(self.values.get("PJSUA_MAX_CALLS", "4"))

    def lines(self) -> list[str]:
        return [f"module={self.module_path}", *(f"{k}={v}" for k, v in self.values.items())]


def read_engine_info() -> EngineInfo:
    spec = importlib.util.find_spec("pjsua2")
    if spec is None or spec.origin is None:
        raise EngineError("the pjsua2 engine is not installed (run `make engine`)")
    info_file = Path(spec.origin).with_name("pjsua2-ENGINE-INFO")
    if not info_file.exists():
        raise EngineError(
            f"{spec.origin} is not callrouter's engine build (no {info_file.name}); "
            "run `make engine` so the router does not run on a capped pjsua2"
        )
    values = {}
    for line in info_file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return EngineInfo(spec.origin, values)
