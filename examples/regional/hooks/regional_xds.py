"""Python hook of ``mappings/ris-reports-xds.yaml``: the one step the mapping language cannot do.

IHE ITI TF-2b 3.41.4.1.2: in a Provide and Register Document Set-b request sent inline (no MTOM), each
``xdsb:Document`` holds its document's bytes as ``xs:base64Binary``.  The mapping's rules build the whole
ebRIM submission and put the report *text* into ``xdsb:Document``; this hook replaces that text by the
base64 of its UTF-8 bytes.  Make this folder importable (``PYTHONPATH=examples/regional/hooks``).
"""

from __future__ import annotations

import base64
from typing import Any

XDSB_DOCUMENT = "{urn:ihe:iti:xds-b:2007}Document"


def encode_documents(_input: Any, output: Any) -> Any:
    """Base64-encode (UTF-8) the text of every ``xdsb:Document`` of ``output`` (an lxml element)."""
    for document in output.iter(XDSB_DOCUMENT):
        document.text = base64.b64encode((document.text or "").encode("utf-8")).decode("ascii")
    return output
