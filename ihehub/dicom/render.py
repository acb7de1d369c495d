"""Rendered images of DICOM frames (PS3.18 8.3.5.1 rendered resources, 9.4 WADO-URI) and their disk cache.

The pixel pipeline of PS3.3 C.11 for display: stored values → Modality LUT (rescale slope/intercept or a
Modality LUT Sequence, C.11.1) → VOI LUT (the requested window, else the data set's Window Center/Width
and VOI LUT Function, else its VOI LUT Sequence, else the full range; C.11.2.1.2) → 8-bit grey, inverted for
MONOCHROME1; colour images (RGB, YBR converted by pydicom, PALETTE COLOR through its LUT, C.7.6.3.1.5)
are scaled to 8 bits.  For integer data the whole chain is one lookup table over the frame's value range,
so a 512×512 CT frame costs a single indexing pass before the JPEG/PNG encoder runs (Pillow).

Sizing: ``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3) crops the source region ``sx,sy,sw,sh``
(a negative ``sw``/``sh`` flips) and scales it to fit ``vw×vh`` keeping its aspect ratio; WADO-URI
``rows``/``columns`` are the same fit (9.4.1.2.5: each a maximum, aspect ratio kept).

`RenderCache` keeps rendered images on disk under a key of the instance's file (size and mtime), frame and
every rendering parameter, so a second viewer reads bytes instead of decoding pixels again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

__all__ = ["MEDIA_TYPES", "RenderCache", "RenderError", "RenderParams", "render_frame", "to_display"]

log = logging.getLogger("ihehub.dicom.web")

# media type -> Pillow format
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit and Explicit VR Little Endian
MAX_SIDE = 8192  # largest rendered width or height
_LUT_SPAN = 1 << 22  # value ranges up to this use a lookup table; wider ones are computed per pixel


class RenderError(ValueError):
    """The frame cannot be rendered as asked; ``status`` is the HTTP answer: 400 a bad parameter, 404 no such
    frame, 406 pixel data that cannot be shown (none, or no decoder for its transfer syntax)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RenderParams:
    """What a rendered image should look like (PS3.18 Table 8.3.5-1 query parameters)."""

    media_type: str = "image/jpeg"
    window: tuple[float, float, str] | None = None  # center, width, function (LINEAR, LINEAR_EXACT, SIGMOID)
    size: tuple[int | None, int | None] | None = None  # fit into width × height (either may be None)
    region: tuple[float, float, float, float] | None = None  # sx, sy, sw, sh of the source
    quality: int = 90

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_TYPES:
            raise RenderError(f"cannot render {self.media_type}; use one of {', '.join(MEDIA_TYPES)}")
        if not 1 <= self.quality <= 100:
            raise RenderError("quality must be 1-100")

    @property
    def key(self) -> str:
        """A stable text of every parameter (part of the cache key)."""
        return f"{self.media_type}|{self.window}|{self.size}|{self.region}|{self.quality}"

    @classmethod
    def parse(cls, *, media_type: str = "image/jpeg", window: str | None = None, viewport: str | None = None,
              quality: str | None = None, default_quality: int = 90) -> RenderParams:
        """From the WADO-RS query parameters ``window=c,w,function``, ``viewport=vw,vh[,sx,sy,sw,sh]``,
        ``quality=1..100`` (PS3.18 8.3.5.1.2-4); raises `RenderError` naming the bad one."""
        win = None
        if window:
            parts = [p.strip() for p in window.split(",")]
            if len(parts) not in (2, 3):
                raise RenderError("window must be center,width[,function]")
            center, width = _numbers("window", parts[:2])
            function = (parts[2] if len(parts) == 3 else "linear").upper().replace("-", "_")
            win = (center, width, function)
        size = region = None
        if viewport:
            parts = [p.strip() for p in viewport.split(",")]
            if len(parts) not in (2, 6):
                raise RenderError("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
            size = (_dimension("viewport width", parts[0]), _dimension("viewport height", parts[1]))
            if len(parts) == 6:
                values = [p or "0" for p in parts[2:]]
                sx, sy, sw, sh = _numbers("viewport", values)
                region = (sx, sy, sw, sh)
        q = default_quality
        if quality:
            try:
                q = int(quality)
            except ValueError:
                raise RenderError(f"quality must be an integer 1-100, not {quality!r}") from None
        return cls(media_type=media_type, window=win, size=size, region=region, quality=q)

    def check(self) -> None:
        if self.window is not None:
            if self.window[2] not in WINDOW_FUNCTIONS:
                raise RenderError(f"window function {self.window[2].lower()} is not one of linear, linear-exact, "
                                  "sigmoid")
            if self.window[1] <= 0 or (self.window[2] == "LINEAR" and self.window[1] < 1):
                raise RenderError("window width must be positive (at least 1 for linear)")
        for side in self.size or ():
            if side is not None and not 1 <= side <= MAX_SIDE:
                raise RenderError(f"rendered sizes are 1-{MAX_SIDE} pixels")


def _numbers(name: str, parts: list[str]) -> list[float]:
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise RenderError(f"{name}: {','.join(parts)} are not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise RenderError(f"{name}: numbers must be finite")
    return values


def _dimension(name: str, text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise RenderError(f"{name} must be an integer, not {text!r}") from None


# -- pixels --------------------------------------------------------------------------------------------------


def render_frame(ds: Dataset, index: int, params: RenderParams,
                 luts: dict[Any, np.ndarray[Any, Any]] | None = None) -> bytes:
    """The frame ``index`` (0-based) of ``ds`` (a data set with its pixel data) as an encoded image;
    ``luts``: a dict the caller keeps, for the lookup tables of `to_display`."""
    params.check()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= index < frames:
        raise RenderError(f"frame {index + 1} does not exist; the instance has {frames}", 404)
    if "PixelData" not in ds:
        raise RenderError("the instance has no pixel data (only Pixel Data (7FE0,0010) is rendered)", 406)
    try:
        arr = _native_frame(ds, index)
        if arr is None:
            arr = pixel_array(ds, index=index) if frames > 1 else ds.pixel_array
    except Exception as exc:
        raise RenderError(f"cannot decode the pixel data: {exc}", 406) from exc
    image = Image.fromarray(to_display(ds, arr, params.window, index=index, luts=luts))
    image = _fit(image, params)
    out = io.BytesIO()
    fmt = MEDIA_TYPES[params.media_type]
    if fmt == "JPEG":
        image.save(out, fmt, quality=params.quality)
    elif fmt == "PNG":
        image.save(out, fmt, compress_level=1)
    else:
        image.save(out, fmt)
    return out.getvalue()


def _native_frame(ds: Dataset, index: int) -> np.ndarray[Any, Any] | None:
    """A frame of uncompressed little endian greyscale pixel data straight from its bytes (PS3.5 8.1.1; bits
    above Bits Stored masked, or sign-extended when Pixel Representation is 1), or None for anything else
    (pydicom then decodes it)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts not in _NATIVE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        return None
    stored = int(ds.get("BitsStored", bits) or bits)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    rows, columns = int(ds.Rows), int(ds.Columns)
    size = rows * columns * bits // 8
    data = ds.PixelData[index * size:(index + 1) * size]
    if len(data) < size:
        return None
    arr = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{bits // 8}").reshape(rows, columns)
    if stored < bits:
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
    return arr


def to_display(ds: Dataset, arr: np.ndarray[Any, Any], window: tuple[float, float, str] | None, *,
               index: int = 0, luts: dict[Any, np.ndarray[Any, Any]] | None = None) -> np.ndarray[Any, Any]:
    """Pixel values of one frame → 8-bit grey (H×W) or RGB (H×W×3) for display; ``luts`` keeps lookup
    tables between calls."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return _to_uint8(arr, 16)
    if arr.ndim == 3:  # colour (pydicom has converted YBR to RGB)
        return _to_uint8(arr, int(ds.get("BitsStored", 8) or 8))
    fixed = window or _dataset_window(ds, index)
    if arr.dtype in (np.uint16, np.int16) and fixed is not None and "ModalityLUTSequence" not in ds:
        # one 64 Ki-entry table per (type, rescale, window, polarity), kept in ``luts``: every slice of a
        # CT series shares it, so a frame costs one indexing pass
        key = (arr.dtype.str, str(ds.get("RescaleSlope", 1)), str(ds.get("RescaleIntercept", 0)), fixed,
               photometric == "MONOCHROME1")
        lut = luts.get(key) if luts is not None else None
        if lut is None:
            lut = _voi(ds, _modality(ds, np.arange(65536, dtype=np.uint16).view(arr.dtype).astype(np.int64)),
                       fixed, index=index)
            if photometric == "MONOCHROME1":
                lut = 255 - lut
            if luts is not None:
                if len(luts) >= 64:
                    luts.clear()
                luts[key] = lut
        return np.ascontiguousarray(lut[arr.view(np.uint16)])
    if arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        out = _voi(ds, values, window, index=index, fallback=(float(values.min()), float(values.max())))
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo <= _LUT_SPAN:
            lut = _voi(ds, _modality(ds, np.arange(lo, hi + 1, dtype=np.int64)), window, index=index)
            out = lut[arr.astype(np.int64, copy=False) - lo] if lo else lut[arr]
        else:
            out = _voi(ds, _modality(ds, arr.astype(np.int64)), window, index=index)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out, dtype=np.uint8)


def _modality(ds: Dataset, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """PS3.3 C.11.1: Modality LUT Sequence or Rescale Slope/Intercept (floats), values unchanged without."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    return values.astype(np.float64)


def _voi(ds: Dataset, x: np.ndarray[Any, Any], window: tuple[float, float, str] | None, *, index: int,
         fallback: tuple[float, float] | None = None) -> np.ndarray[Any, Any]:
    """PS3.3 C.11.2.1.2 window functions (or the VOI LUT Sequence) → uint8."""
    if window is None:
        window = _dataset_window(ds, index)
    if window is None and "VOILUTSequence" in ds:
        y = np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), dtype=np.float64)
        lo, hi = float(y.min()), float(y.max())
        return np.clip((y - lo) * (255.0 / (hi - lo) if hi > lo else 0.0), 0, 255).astype(np.uint8)
    if window is None:
        lo, hi = fallback if fallback is not None else (float(x.min()), float(x.max()))
        window = ((lo + hi) / 2, max(hi - lo, 1.0), "LINEAR_EXACT")
    center, width, function = window
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    else:  # LINEAR
        y = ((x - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _dataset_window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """Window Center/Width (0028,1050/1051) and VOI LUT Function (0028,1056) of the data set, or of the
    frame's functional group (multi-frame, C.7.6.16.2.10)."""
    source: Any = ds
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if "WindowCenter" not in ds and groups is not None and index < len(groups):
        voi = groups[index].get("FrameVOILUTSequence")
        if voi:
            source = voi[0]
    if "WindowCenter" not in ds and source is ds:
        shared = ds.get("SharedFunctionalGroupsSequence")
        voi = shared[0].get("FrameVOILUTSequence") if shared else None
        if voi:
            source = voi[0]
    try:
        center, width = source.get("WindowCenter"), source.get("WindowWidth")
        if center is None or width is None:
            return None
        c = float(center[0] if _multi(center) else center)
        w = float(width[0] if _multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS or w <= 0:
        function = "LINEAR"
    if function == "LINEAR" and w < 1:
        return None
    return c, w, function


def _multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _to_uint8(arr: np.ndarray[Any, Any], bits: int) -> np.ndarray[Any, Any]:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    shift = max(bits - 8, 0)
    return np.ascontiguousarray(np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8))


def _fit(image: Image.Image, params: RenderParams) -> Image.Image:
    if params.region is not None:
        sx, sy, sw, sh = params.region
        w, h = image.size
        sw = sw or w - sx
        sh = sh or h - sy
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        box = (max(0, round(left)), max(0, round(top)), min(w, round(right)), min(h, round(bottom)))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise RenderError("the viewport's source region is outside the image")
        image = image.crop(box)
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if params.size is None:
        return image
    want_w, want_h = params.size
    w, h = image.size
    scales = [s for s in (want_w / w if want_w else None, want_h / h if want_h else None) if s is not None]
    if not scales:
        return image
    scale = min(scales)
    new = (max(1, min(MAX_SIDE, round(w * scale))), max(1, min(MAX_SIDE, round(h * scale))))
    if new == image.size:
        return image
    return image.resize(new, Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)


# -- cache ---------------------------------------------------------------------------------------------------


class RenderCache:
    """Rendered images on disk, ``<root>/<ab>/<key>``; oldest files dropped beyond ``max_bytes``.

    Thread-safe; files are written to a temporary name and renamed, so readers never see half an image.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size: int | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def key(path: Path, frame: int, params: RenderParams) -> str:
        """The key of a rendering: the file (path, size, modification time), the frame, the parameters."""
        st = path.stat()
        text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{frame}|{params.key}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        try:
            data = self._path(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if not self.enabled:
            return
        path = self._path(key)
        tmp = path.with_name(f".{key}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk must not fail the request: the image is still answered
            log.warning("cannot cache a rendered frame: %s", exc)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            if self._size is None:
                self._size = self._measure()
            else:
                self._size += len(data)
            if self._size > self.max_bytes:
                self._size = self._prune(int(self.max_bytes * 0.8))

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.root.glob("*/*"):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out

    def _measure(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _prune(self, target: int) -> int:
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, p in files:
            if total <= target:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
        return total
