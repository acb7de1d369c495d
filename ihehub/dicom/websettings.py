"""Settings of DICOMweb on the hub's HTTP app (``actors.dicom.dicomweb`` in ``ihehub.yaml``).

* ``cors_origins``: origins a browser viewer may call ``/dicomweb`` and ``/wado`` from (Fetch CORS);
  ``["*"]`` allows any origin, ``[]`` (the default) sends no CORS headers.
* ``cache_mb``: disk space for rendered frames (``data_dir/dicomweb-cache``), oldest dropped first; 0 turns
  the cache off.
* ``stow_max_mb``: the largest STOW-RS request body accepted (413 above it).
* ``prefetch``: after the first rendered frame of a series, render the rest of the series with the same
  parameters in the background, so that a viewer scrolling through a 500-slice CT reads from the cache.
* ``prerender`` (default on): render the first frame of every instance stored with STOW-RS in the background
  (and of every study handed to `DicomWeb.prerender_study`: the hub does so on each study-complete event of
  the image manager), so that a study streams from the cache from its first view.  The cache's ``cache_mb``
  bounds the disk it takes (oldest frames dropped first: recent studies, the ones viewed, stay rendered);
  turn it off on a node that stores far more than it shows.
* ``default_quality``: JPEG quality of rendered images when the request gives none (PS3.18 8.3.5.1.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["DICOMWEB_SCHEMA", "DicomWebSettings"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DicomWebSettings:
    """DICOMweb (PS3.18) options; see the module docstring."""

    cors_origins: tuple[str, ...] = ()
    cache_mb: int = 1024
    stow_max_mb: int = 2048
    prefetch: bool = True
    prerender: bool = True
    default_quality: int = 90

    def __post_init__(self) -> None:
        if self.cache_mb < 0:
            raise ValueError("dicomweb.cache_mb: must be 0 (no cache) or more")
        if self.stow_max_mb < 1:
            raise ValueError("dicomweb.stow_max_mb: must be at least 1")
        if not 1 <= self.default_quality <= 100:
            raise ValueError("dicomweb.default_quality: must be 1-100")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> DicomWebSettings:
        """Build from the YAML-shaped ``dicomweb`` mapping; `ValueError` names a wrong key."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"dicomweb.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
        origins = data.pop("cors_origins", ())
        if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
            raise ValueError("dicomweb.cors_origins: expected a list of origins such as https://viewer.example")
        for key, kind in (("cache_mb", int), ("stow_max_mb", int), ("default_quality", int), ("prefetch", bool),
                          ("prerender", bool)):
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ValueError(f"dicomweb.{key}: expected {'true or false' if kind is bool else 'an integer'}, "
                                 f"got {value!r}")
        return cls(cors_origins=tuple(origins), **data)


DICOMWEB_SCHEMA: dict[str, Any] = {
    "description": "DICOMweb (PS3.18) at /dicomweb and WADO-URI at /wado on the HTTP listener",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cors_origins": {"type": "array", "items": {"type": "string"},
                         "description": "browser origins allowed to call DICOMweb (CORS); ['*'] for any"},
        "cache_mb": {"type": "integer", "minimum": 0, "description": "disk cache of rendered frames (MB)"},
        "stow_max_mb": {"type": "integer", "minimum": 1, "description": "largest STOW-RS request (MB)"},
        "prefetch": {"type": "boolean", "description": "render the rest of a series after its first frame"},
        "prerender": {"type": "boolean", "description": "render new studies in the background (default true)"},
        "default_quality": {"type": "integer", "minimum": 1, "maximum": 100},
    },
}
