"""Values and DICOM JSON of repeated raw data elements, converted once per distinct encoding.

The instances of a series repeat most of their attributes byte for byte: patient, study, series,
equipment, acquisition settings.  pydicom converts every raw element of every instance (dictionary VR
lookup, character set decoding, value parsing: ~20-40 µs each), and for the index rows and the series
metadata of a 500-slice CT that was most of the index worker's CPU — the work that competed with the
receiving thread for the two cores.  `ElementCache` keeps what a conversion gave, keyed by everything that
decides it: the tag, the VR as encoded (none in implicit VR), the value bytes, implicit/explicit VR and
endianness, and the data set's Specific Character Set as encoded.  A later instance with the same bytes
gets the same value and the same JSON object without conversion.

Not cached (converted every time, as pydicom does): values longer than ``max_value`` bytes (large binary
values are where JSON says BulkDataURI, which names the instance), sequences, private tags (their VR may
depend on the private creator), tags whose VR depends on other attributes (``US or SS``, ``OB or OW``...),
elements pydicom already converted.  Cached objects are shared: callers only read them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

__all__ = ["ElementCache"]

_CHARSET = 0x00080005
_NOT_RAW = object()


class ElementCache:
    """Converted values (`value`) and DICOM JSON (`json`) of small raw elements, by their encoding."""

    def __init__(self, *, max_entries: int = 50_000, max_value: int = 256) -> None:
        self.max_entries = max_entries
        self.max_value = max_value
        self._values: dict[tuple[Any, ...], Any] = {}
        self._json: dict[tuple[Any, ...], Any] = {}
        self._cacheable: dict[int, bool] = {}
        self._last: tuple[Dataset | None, tuple[str, ...]] = (None, ())  # the data set asked about last
        self.hits = 0
        self.misses = 0

    def value(self, ds: Dataset, tag: int) -> Any:
        """``ds[tag].value`` (KeyError when absent; pydicom's errors for a value it cannot convert)."""
        return self._cached(self._values, ds, tag, lambda: ds[tag].value)

    def json(self, ds: Dataset, tag: int, *, bulk_data_threshold: int,
             bulk_data_element_handler: Callable[[DataElement], str] | None) -> dict[str, Any]:
        """``ds[tag].to_json_dict(...)`` (PS3.18 F.2), the same object for the same encoding."""
        return cast(dict[str, Any], self._cached(
            self._json, ds, tag, lambda: ds[tag].to_json_dict(bulk_data_element_handler, bulk_data_threshold)))

    def _cached(self, table: dict[tuple[Any, ...], Any], ds: Dataset, tag: int, convert: Callable[[], Any]) -> Any:
        key = self._key(ds, tag)
        if key is None:
            return convert()
        try:
            found = table[key]
        except KeyError:
            pass
        else:
            self.hits += 1
            return found
        self.misses += 1
        out = convert()
        if len(table) >= self.max_entries:
            table.clear()  # a new study's values take over; no bookkeeping per hit
        table[key] = out
        return out

    def dataset_json(self, ds: Dataset, *, bulk_data_threshold: int,
                     bulk_data_element_handler: Callable[[DataElement], str] | None) -> dict[str, Any]:
        """``ds.to_json_dict(...)``, each element through `json`."""
        return {f"{int(tag):08X}": self.json(ds, int(tag), bulk_data_threshold=bulk_data_threshold,
                                             bulk_data_element_handler=bulk_data_element_handler)
                for tag in ds.keys()}  # noqa: SIM118  # iterating a Dataset yields its elements

    def _key(self, ds: Dataset, tag: int) -> tuple[Any, ...] | None:
        raw = ds._dict.get(tag)  # type: ignore[call-overload]  # the element as read, not converted
        if raw is None:
            raise KeyError(tag)
        if not isinstance(raw, RawDataElement):
            return None
        value = raw.value
        if value is None or len(value) > self.max_value or raw.VR == "SQ" or not self._is_cacheable(tag):
            return None
        last, charset = self._last
        if last is not ds:
            charset = _charset(ds)
            self._last = (ds, charset)
        return (tag, raw.VR, bytes(value), raw.is_implicit_VR, raw.is_little_endian, charset)

    def _is_cacheable(self, tag: int) -> bool:
        known = self._cacheable.get(tag)
        if known is None:
            if (tag >> 16) & 1:
                known = False  # private: the VR depends on the private creator
            else:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    known = False
                else:
                    known = " or " not in vr and vr != "SQ"
            self._cacheable[tag] = known
        return known


def _charset(ds: Dataset) -> tuple[str, ...]:
    """The Specific Character Set's terms, the same whether the element is still raw or converted."""
    elem = ds._dict.get(_CHARSET)  # type: ignore[call-overload]
    if elem is None:
        return ()
    value = elem.value
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("ascii", errors="replace").split("\\")
    elif isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip() for v in (value or ()))
