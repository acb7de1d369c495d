"""The configuration as typed, frozen values: `HubConfig` (ihehub.yaml) and `ChannelConfig`.

Every field has the default that ``init_home`` writes into a new home, so ``HubConfig(home=p)``
is exactly the configuration of a freshly initialised home ``p``.  Relative paths (``data_dir``,
the TLS files, a relative ``sqlite:///`` database) are resolved against ``home`` on construction.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ihehub.bus.retry import RetryPolicy

__all__ = [
    "ActorsConfig",
    "AtnaConfig",
    "AuthConfig",
    "ChannelConfig",
    "DeliveryConfig",
    "DestinationConfig",
    "DicomActorConfig",
    "HttpConfig",
    "HubConfig",
    "MllpActorConfig",
    "RetentionConfig",
    "RetryPolicy",
    "SourceConfig",
    "StoreConfig",
    "SyslogActorConfig",
    "TimeConfig",
    "TlsConfig",
    "XdsActorConfig",
]

_SQLITE_RELATIVE = re.compile(r"^(sqlite(?:\+[A-Za-z0-9_]+)?):///(?!/|:memory:|file:)(.+)$")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HttpConfig:
    """The one HTTP listener: admin API, SOAP (XDS), DICOMweb and FHIR."""

    host: str = "0.0.0.0"
    port: int = 8080


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """PEM files of the node's private CA and of its server certificate (see :mod:`ihehub.tls`)."""

    ca: Path = Path("tls/ca.pem")
    cert: Path = Path("tls/server.pem")
    key: Path = Path("tls/server-key.pem")
    ca_key: Path = Path("tls/ca-key.pem")

    def resolved(self, home: Path) -> TlsConfig:
        return TlsConfig(
            ca=_under(home, self.ca),
            cert=_under(home, self.cert),
            key=_under(home, self.key),
            ca_key=_under(home, self.ca_key),
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MllpActorConfig:
    """HL7 v2 over MLLP (HL7 v2.5.1 Appendix C, "Minimal Lower Layer Protocol")."""

    port: int = 2575


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DicomActorConfig:
    """DICOM upper layer listener (PS3.8); ``ae_title`` is the hub's Application Entity title."""

    port: int = 11112
    ae_title: str = "IHEHUB"
    enabled: bool = True
    nodes: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> {ae_title, host, port, tls}
    study_quiet_seconds: float = 30.0  # a study is complete (XDS-I.b, routing) once quiet this long
    routing_tags: tuple[str, ...] = ()  # extra attributes (keywords or tags) in the study-complete message
    tls_port: int | None = None  # DICOM over TLS (PS3.15 B.1) on this port with the node's certificate
    require_client_cert: bool = True  # on the TLS port: True refuses a client without a certificate of our CA
    dicomweb: dict[str, Any] = dataclasses.field(default_factory=lambda: {  # ihehub.dicom.websettings
        "cors_origins": [], "cache_mb": 1024, "stow_max_mb": 2048, "prefetch": True, "prerender": True,
        "default_quality": 90})
    # the index's patients linked to the hub's EMPI (ihehub.dicom.patients.EmpiLinkSettings): enabled, default_issuer,
    # unknown (wait | register), cross_domain, retry_seconds, demographics
    empi: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "enabled": True, "default_issuer": "", "unknown": "wait", "cross_domain": False, "retry_seconds": 60,
        "demographics": True})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SyslogActorConfig:
    """ATNA audit record repository: syslog over TLS (RFC 5425) and over UDP (RFC 5426)."""

    tls_port: int = 6514
    udp_port: int = 5140


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class XdsActorConfig:
    """XDS.b Document Registry + Repository on the HTTP port (``/xds/registry``, ``/xds/repository``).

    ``repository_unique_id``: default 1.3.6.1.4.1.21367.2017.2.3.4242.1 (IHE test arc; set your own OID).
    ``patient_check``: "empi" (patient ids must be known to the hub's EMPI: XDSUnknownPatientId) or "none";
    None means "empi" when an EMPI runs, else "none".  ``registry_url``: an external Document Registry's
    ITI-42 endpoint the repository registers with (default: the hub's own registry)."""

    enabled: bool = True
    repository_unique_id: str = "1.3.6.1.4.1.21367.2017.2.3.4242.1"
    home_community_id: str | None = None
    max_results: int = 1000
    patient_check: str | None = None
    registry_url: str | None = None  # ITI-41 registers with this external registry (ITI-42) instead of ours
    # XDS-I.b Imaging Document Source (RAD-68 publish, RAD-69 at /xds/imaging), see docs/xds.md
    imaging: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "enabled": False, "source_id": None, "auto_publish": True, "default_domain": None, "issuers": {},
        "retrieve_ae_title": None, "wado_url": None, "institution": None, "codes": {
            "class_code": ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"],
            "type_code": ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"],
            "confidentiality_code": ["N", "2.16.840.1.113883.5.25", "normal"],
            "healthcare_facility_type_code": ["22232009", "2.16.840.1.113883.6.96", "Hospital"],
            "practice_setting_code": ["394914008", "2.16.840.1.113883.6.96", "Radiology"],
            "content_type_code": ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"],
            "language_code": "zh-CN"}})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ActorsConfig:
    mllp: MllpActorConfig = dataclasses.field(default_factory=MllpActorConfig)
    dicom: DicomActorConfig = dataclasses.field(default_factory=DicomActorConfig)
    syslog: SyslogActorConfig = dataclasses.field(default_factory=SyslogActorConfig)
    xds: XdsActorConfig = dataclasses.field(default_factory=XdsActorConfig)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryConfig:
    """Default retry policy of every destination plus the lease a worker holds on a queued message."""

    max_attempts: int = 10
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    lease_seconds: float = 30.0

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StoreConfig:
    """Group commit: up to ``max_batch`` writes share one transaction.  Writes that arrive while a commit
    is in flight always join the next one; ``group_commit_ms`` > 0 additionally waits that long for more
    (fewer fsyncs on slow disks, at the price of latency for a lone sender)."""

    group_commit_ms: int = 0
    max_batch: int = 500


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RetentionConfig:
    """Message bodies older than ``body_days`` are pruned (metadata kept); 0 keeps them forever."""

    body_days: int = 30


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AtnaConfig:
    """The Audit Record Repository (listening on ``actors.syslog`` ports) and this node's audit trail.

    ``schema`` / ``schematron``: the DICOM audit XSD and the connectathon Schematron folder; when absent,
    received messages are stored without validation (a warning says so).  ``require_client_cert``:
    True, False or "optional" for the TLS listener.
    """

    enabled: bool = True
    schema: Path = Path("atna/dicom2017c.xsd")
    schematron: Path = Path("atna/schematron")
    require_client_cert: bool | str = "optional"
    tcp_port: int | None = None
    max_frame: int = 1048576
    workers: int = 0  # processes validating received messages (0: in the event loop)
    retention_days: int = 0
    enterprise_site: str | None = None
    # other repositories this node's audits go to, besides its own: [{url: syslog+tls://host:6514, ...}]
    repositories: tuple[dict[str, Any], ...] = ()
    # their queue (atna_outbox): reconnect backoff cap, give up (dead) after, keep sent rows for, and
    # /healthz degraded when an audit waits longer than outbox_alert_after (seconds; 0 = never)
    outbox_max_backoff: float = 60.0
    outbox_expire_hours: float = 168.0
    outbox_keep_sent_hours: float = 24.0
    outbox_alert_after: float = 900.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TimeConfig:
    """Consistent Time (ITI-1) client: NTP ``servers`` ("host" or "host:port"; none: off), asked every
    ``interval`` seconds; an offset beyond ``threshold`` seconds is alerted and audited."""

    servers: tuple[str, ...] = ()
    interval: float = 64.0
    threshold: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuthConfig:
    """``required`` False turns off bearer-token checks on the API (development only)."""

    required: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HubConfig:
    """Settings of one node: the home folder's ``ihehub.yaml`` after environment overrides."""

    home: Path = Path("var")
    node_id: str = "ihehub-1"
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    database: str = "sqlite:///db/ihehub.sqlite"
    broker: str | None = None
    queue_prefix: str = "ihehub"
    data_dir: Path = Path("data")
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    actors: ActorsConfig = dataclasses.field(default_factory=ActorsConfig)
    delivery: DeliveryConfig = dataclasses.field(default_factory=DeliveryConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    atna: AtnaConfig = dataclasses.field(default_factory=AtnaConfig)
    time: TimeConfig = dataclasses.field(default_factory=TimeConfig)
    log_level: str = "info"

    def __post_init__(self) -> None:
        # Frozen, so resolution writes through object.__setattr__ once, at construction.
        home = Path(self.home).expanduser().absolute()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "data_dir", _under(home, self.data_dir))
        object.__setattr__(self, "tls", self.tls.resolved(home))
        object.__setattr__(self, "atna", dataclasses.replace(
            self.atna, schema=_under(home, self.atna.schema), schematron=_under(home, self.atna.schematron)))
        object.__setattr__(self, "database", resolve_database(self.database, home))

    @property
    def config_file(self) -> Path:
        return self.home / "ihehub.yaml"

    @property
    def channels_dir(self) -> Path:
        return self.home / "channels"

    @property
    def db_dir(self) -> Path:
        return self.home / "db"

    @property
    def embedded_broker(self) -> bool:
        """True when queues live in the database (no RabbitMQ)."""
        return self.broker is None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    url: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DestinationConfig:
    """One destination of a channel; ``retry`` is ``delivery:`` overlaid with the file's ``retry:``."""

    name: str
    url: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    filter: tuple[str, ...] = ()
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChannelConfig:
    """One ``channels/*.yaml`` file.  ``filter`` holds expressions that must all hold (empty: none)."""

    name: str
    source: SourceConfig
    description: str = ""
    enabled: bool = True
    filter: tuple[str, ...] = ()
    transformer: str | None = None
    mapping: str | None = None  # a mapping file, relative to the home (ihehub.mappings)
    actor: str | None = None  # registered actor name or "package.module:Class"
    actor_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fifo: bool = False
    dedup: bool = False
    destinations: tuple[DestinationConfig, ...] = ()
    file: Path | None = None


def _under(home: Path, path: Path | str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else home / p


def resolve_database(url: str, home: Path) -> str:
    """Make a relative ``sqlite:///db/x.sqlite`` absolute under ``home``; other URLs are unchanged.

    SQLAlchemy reads ``sqlite:///rel`` relative to the working directory and ``sqlite:////abs`` as
    absolute; ``sqlite://`` and ``sqlite:///:memory:`` are in-memory databases.
    """
    match = _SQLITE_RELATIVE.match(url)
    if match is None:
        return url
    path, sep, query = match.group(2).partition("?")
    return f"{match.group(1)}:///{_under(home, path).as_posix()}{sep}{query}"
