"""HL7 v2 helpers, free of any framework: header parsing, charsets, acknowledgments.

python-hl7 (``hl7``) is used for full parsing (`parse_message`); the per-message hot path
(`parse_header`, `build_ack`) only splits MSH.
"""

from ihehub.hl7.ack import (
    ACK_CODES,
    SEVERITIES,
    AckInfo,
    build_ack,
    build_nak_without_header,
    hl7_timestamp,
    new_control_id,
    read_ack,
)
from ihehub.hl7.charsets import (
    CHARSETS,
    codec_for_msh18,
    default_codec,
    normalize_charset_name,
    python_codec,
)
from ihehub.hl7.codec import (
    MESSAGE_CODES,
    UTF8_BOM,
    VERSIONS,
    Header,
    MessageTypeFilter,
    escape,
    known_message_code,
    parse_header,
    parse_message,
    unescape,
)
from ihehub.hl7.errors import ERROR_CODES, HL7Error, describe_error

__all__ = [
    "ACK_CODES",
    "CHARSETS",
    "ERROR_CODES",
    "MESSAGE_CODES",
    "SEVERITIES",
    "UTF8_BOM",
    "VERSIONS",
    "AckInfo",
    "HL7Error",
    "Header",
    "MessageTypeFilter",
    "build_ack",
    "build_nak_without_header",
    "codec_for_msh18",
    "default_codec",
    "describe_error",
    "escape",
    "hl7_timestamp",
    "known_message_code",
    "new_control_id",
    "normalize_charset_name",
    "parse_header",
    "parse_message",
    "python_codec",
    "read_ack",
    "unescape",
]
