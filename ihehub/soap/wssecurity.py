"""WS-Security header: UsernameToken and Timestamp, built (client) and checked (server).

OASIS Web Services Security: SOAP Message Security 1.1 (WSS 1.1) section 5 (the ``wsse:Security``
header), section 10 (``wsu:Timestamp``), section 12 (fault codes), and the UsernameToken Profile 1.1:

- section 3.1: ``wsse:Password`` of type ``#PasswordText`` (the password itself) or ``#PasswordDigest``
  = Base64(SHA-1(nonce + created + password)), where *nonce* is the decoded ``wsse:Nonce`` bytes and
  *created* the ``wsu:Created`` text as sent;
- section 4: a receiver rejects tokens whose ``wsu:Created`` is outside its freshness window and
  remembers nonces for that window, so a captured digest cannot be replayed.

Failures raise `SoapFault` with code ``Sender`` and the WSS subcode (``wsse:FailedAuthentication``,
``wsse:InvalidSecurity``, ``wsse:MessageExpired``); the reason never says which of user name or
password was wrong.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from lxml import etree

from ihehub.soap.fault import SOAP11, SOAP12, SoapFault

__all__ = [
    "PASSWORD_DIGEST",
    "PASSWORD_TEXT",
    "SECURITY",
    "WSSE_NS",
    "WSU_NS",
    "Credentials",
    "NonceCache",
    "SecurityResult",
    "WsseFault",
    "password_digest",
    "security_header",
    "verify_security",
]

WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
_PROFILE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
PASSWORD_TEXT = f"{_PROFILE}#PasswordText"
PASSWORD_DIGEST = f"{_PROFILE}#PasswordDigest"
BASE64_BINARY = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-soap-message-security-1.0#Base64Binary"
SECURITY = f"{{{WSSE_NS}}}Security"  # Clark notation, for parse_envelope(understood=...)
DEFAULT_FRESHNESS = 300.0  # seconds; UsernameToken Profile 1.1 section 4 suggests "a few minutes"
CLOCK_SKEW = 60.0  # seconds a peer's clock may be off when Timestamp Created/Expires are checked


def _utc(moment: float) -> str:
    """``2026-11-27T11:40:23.123Z`` (XML Schema dateTime in UTC, as WSS 1.1 section 10 recommends)."""
    stamp = dt.datetime.fromtimestamp(moment, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _parse_utc(text: str) -> float:
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise _invalid(f"wsu time {text!r} is not an XML Schema dateTime") from None
    if value.tzinfo is None:  # WSS 1.1 section 10: times without a zone are taken as UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def password_digest(nonce: bytes, created: str, password: str) -> str:
    """UsernameToken Profile 1.1 section 3.1: Base64(SHA-1(nonce + created + password))."""
    digest = hashlib.sha1(nonce + created.encode("utf-8") + password.encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def security_header(*, soap_ns: str, username: str | None = None, password: str | None = None,
                    digest: bool = False, timestamp_ttl: float | None = None, now: float | None = None,
                    nonce: bytes | None = None) -> etree._Element:
    """A ``wsse:Security`` header block (mustUnderstand) with a Timestamp when ``timestamp_ttl`` is set and a
    UsernameToken when ``username`` is set (digest: with a fresh 16-byte nonce and Created)."""
    moment = time.time() if now is None else now
    sec = etree.Element(SECURITY, nsmap={"wsse": WSSE_NS, "wsu": WSU_NS})
    sec.set(f"{{{soap_ns}}}mustUnderstand", "1" if soap_ns == SOAP11 else "true")
    if timestamp_ttl is not None:
        ts = etree.SubElement(sec, f"{{{WSU_NS}}}Timestamp")
        ts.set(f"{{{WSU_NS}}}Id", "TS-1")
        etree.SubElement(ts, f"{{{WSU_NS}}}Created").text = _utc(moment)
        etree.SubElement(ts, f"{{{WSU_NS}}}Expires").text = _utc(moment + timestamp_ttl)
    if username is not None:
        token = etree.SubElement(sec, f"{{{WSSE_NS}}}UsernameToken")
        token.set(f"{{{WSU_NS}}}Id", "UT-1")
        etree.SubElement(token, f"{{{WSSE_NS}}}Username").text = username
        pw = etree.SubElement(token, f"{{{WSSE_NS}}}Password")
        if digest:
            raw_nonce = os.urandom(16) if nonce is None else nonce
            created = _utc(moment)
            pw.set("Type", PASSWORD_DIGEST)
            pw.text = password_digest(raw_nonce, created, password or "")
            nonce_el = etree.SubElement(token, f"{{{WSSE_NS}}}Nonce")
            nonce_el.set("EncodingType", BASE64_BINARY)
            nonce_el.text = base64.b64encode(raw_nonce).decode("ascii")
            etree.SubElement(token, f"{{{WSU_NS}}}Created").text = created
        else:
            pw.set("Type", PASSWORD_TEXT)
            pw.text = password or ""
    return sec


class NonceCache:
    """Nonces seen within the freshness window (UsernameToken Profile 1.1 section 4), bounded in size."""

    def __init__(self, window: float, max_entries: int = 100_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        """True the first time ``nonce`` is offered within the window, False for a replay."""
        with self._lock:
            while self._seen:
                oldest, at = next(iter(self._seen.items()))
                if at > now - self.window and len(self._seen) < self.max_entries:
                    break
                del self._seen[oldest]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


@dataclass(frozen=True)
class Credentials:
    """What a receiver accepts: one user, and which password types (``text``, ``digest`` or ``any``)."""

    username: str
    password: str
    password_type: str = "any"


@dataclass(frozen=True)
class SecurityResult:
    username: str | None = None
    created: str | None = None  # wsu:Timestamp/wsu:Created


class WsseFault(SoapFault):
    """A WSS 1.1 section 12 fault: SOAP 1.2 ``env:Sender`` with the ``wsse:`` subcode (as `SoapFault`); in SOAP 1.1
    the ``wsse:`` QName itself is the faultcode."""

    def body(self, soap_ns: str = SOAP12) -> etree._Element:
        if soap_ns != SOAP11 or self.subcode is None:
            return super().body(soap_ns)
        fault = etree.Element(f"{{{SOAP11}}}Fault", nsmap={"env": SOAP11, "wsse": WSSE_NS})
        etree.SubElement(fault, "faultcode").text = f"wsse:{self.subcode[1]}"
        etree.SubElement(fault, "faultstring").text = self.reason
        return fault


def _invalid(reason: str, code: str = "InvalidSecurity") -> WsseFault:
    return WsseFault("Sender", reason, subcode=(WSSE_NS, code))


def _failed(reason: str) -> WsseFault:
    return _invalid(reason, "FailedAuthentication")


def _check_timestamp(sec: etree._Element, now: float, skew: float) -> str | None:
    """WSS 1.1 section 10: a message whose Expires has passed is refused (wsse:MessageExpired)."""
    ts = sec.find(f"{{{WSU_NS}}}Timestamp")
    if ts is None:
        return None
    created = ts.findtext(f"{{{WSU_NS}}}Created")
    expires = ts.findtext(f"{{{WSU_NS}}}Expires")
    if created is None:
        raise _invalid("wsu:Timestamp without wsu:Created")
    if _parse_utc(created) > now + skew:
        raise _invalid("wsu:Timestamp/wsu:Created is in the future")
    if expires is not None and _parse_utc(expires) + skew < now:
        raise _invalid(f"the message expired at {expires.strip()}", "MessageExpired")
    return created.strip()


def _check_token(token: etree._Element, creds: Credentials, now: float, freshness: float,
                 nonces: NonceCache | None) -> str:
    username = (token.findtext(f"{{{WSSE_NS}}}Username") or "").strip()
    pw = token.find(f"{{{WSSE_NS}}}Password")
    if pw is None:
        raise _failed("the UsernameToken has no password")
    kind = (pw.get("Type") or PASSWORD_TEXT).strip()
    offered = (pw.text or "").strip()
    if kind == PASSWORD_DIGEST:
        if creds.password_type == "text":
            raise _failed("this endpoint accepts PasswordText only")
        nonce_text = (token.findtext(f"{{{WSSE_NS}}}Nonce") or "").strip()
        created = (token.findtext(f"{{{WSU_NS}}}Created") or "").strip()
        if not nonce_text or not created:
            raise _failed("a PasswordDigest needs wsse:Nonce and wsu:Created")
        try:
            nonce = base64.b64decode(nonce_text, validate=True)
        except (binascii.Error, ValueError):
            raise _failed("wsse:Nonce is not base64") from None
        moment = _parse_utc(created)
        if abs(now - moment) > freshness:
            raise _failed("the UsernameToken's wsu:Created is outside the freshness window")
        expected = password_digest(nonce, created, creds.password)
        good = hmac.compare_digest(expected.encode(), offered.encode())
        if good and nonces is not None and not nonces.first_use(nonce_text, now):
            raise _failed("the UsernameToken nonce was used before (replay)")
    elif kind == PASSWORD_TEXT:
        if creds.password_type == "digest":
            raise _failed("this endpoint accepts PasswordDigest only")
        good = hmac.compare_digest(offered.encode("utf-8"), creds.password.encode("utf-8"))
    else:
        raise _failed(f"unsupported wsse:Password Type {kind!r}")
    if not good or not hmac.compare_digest(username.encode("utf-8"), creds.username.encode("utf-8")):
        raise _failed("the user name or password is wrong")
    return username


def verify_security(header: etree._Element | None, *, credentials: Credentials | None = None,
                    require_timestamp: bool = False, freshness: float = DEFAULT_FRESHNESS,
                    nonces: NonceCache | None = None, now: float | None = None) -> SecurityResult:
    """Check the ``wsse:Security`` block of ``header``: Timestamp when present (or required), UsernameToken when
    ``credentials`` are set.  `SoapFault` (Sender, with the WSS 1.1 section 12 subcode) on any failure."""
    moment = time.time() if now is None else now
    sec = header.find(SECURITY) if header is not None else None
    if sec is None:
        if credentials is not None:
            raise _failed("a wsse:Security header with a UsernameToken is required")
        if require_timestamp:
            raise _invalid("a wsse:Security header with a wsu:Timestamp is required")
        return SecurityResult()
    created = _check_timestamp(sec, moment, CLOCK_SKEW)
    if created is None and require_timestamp:
        raise _invalid("a wsu:Timestamp is required")
    username = None
    if credentials is not None:
        tokens = sec.findall(f"{{{WSSE_NS}}}UsernameToken")
        if len(tokens) != 1:
            raise _failed("exactly one wsse:UsernameToken is required")
        username = _check_token(tokens[0], credentials, moment, freshness, nonces)
    return SecurityResult(username=username, created=created)
