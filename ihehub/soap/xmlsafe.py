"""Safe XML parsing for everything the hub receives over SOAP.

No DTD at all (a document type declaration is refused before libxml2 sees it, so neither external
entities (XXE) nor internal entity expansion ("billion laughs") can happen), no network access, no entity
resolution, and a size limit.  ``huge_tree`` is on only because, with DTDs refused, the one remaining large
thing is an inline base64 ``xdsb:Document`` text node (libxml2 caps text nodes at 10 MB otherwise).
"""

from __future__ import annotations

import re

from lxml import etree

__all__ = ["DEFAULT_MAX_XML", "XmlRefused", "parse_xml"]

DEFAULT_MAX_XML = 128 * 1024 * 1024

# the prolog: BOM, XML declaration, processing instructions, comments and white space before the root element
_PROLOG_ITEM = re.compile(rb"\s+|<\?.*?\?>|<!--.*?-->", re.S)


class XmlRefused(ValueError):
    """The bytes are not acceptable XML: too large, a DTD, or not well-formed."""


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=True, remove_blank_text=False, collect_ids=False)


def _has_doctype(data: bytes) -> bool:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16: look at the decoded prolog
        data = data[:4096].decode("utf-16", errors="ignore").encode()
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    while True:
        m = _PROLOG_ITEM.match(data, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
    return data[pos:pos + 9].upper() == b"<!DOCTYPE"


def parse_xml(data: bytes, *, max_size: int = DEFAULT_MAX_XML) -> etree._Element:
    """The root element of ``data``; `XmlRefused` when it is too large, declares a DTD or is not well-formed."""
    if len(data) > max_size:
        raise XmlRefused(f"XML of {len(data)} bytes exceeds the limit of {max_size} bytes")
    if _has_doctype(data):
        raise XmlRefused("a document type declaration (DTD) is not allowed")
    try:
        tree = etree.ElementTree(etree.fromstring(data, _parser()))
    except etree.XMLSyntaxError as exc:
        raise XmlRefused(f"not well-formed XML: {exc}") from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:  # belt and braces (odd encodings)
        raise XmlRefused("a document type declaration (DTD) is not allowed")
    return tree.getroot()
