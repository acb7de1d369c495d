"""The files ``init_home`` writes into a new home folder: every key present, every key explained.

The values equal the dataclass defaults of :mod:`ihehub.config.model` (a test keeps them equal).
"""

from __future__ import annotations

HUB_YAML = """\
# ihehub node settings.  Every key is optional: a missing key takes the value shown here.
# Checked on start against ihehub/config/schemas/hub.json; every problem is reported with its
# file:line.  Relative paths are relative to this folder (the home, $IHEHUB_HOME).

# Names this node in logs, in the ACKs it sends (MSH-3/MSH-4) and in audit records.
# Letters, digits, '.', '-', '_'; at most 64 characters.
node_id: ihehub-1

# One HTTP listener for the admin API, SOAP (XDS.b), DICOMweb and FHIR.
# $IHEHUB_HTTP_PORT overrides the port.
http:
  host: 0.0.0.0            # 127.0.0.1 to accept local connections only
  port: 8080

# Message store (SQLAlchemy URL).  A relative sqlite path is relative to this folder;
# scale-out: postgresql+psycopg://user:password@host/dbname.  $IHEHUB_DATABASE overrides it.
database: sqlite:///db/ihehub.sqlite

# Queues.  null = embedded queue in the database (one process);
# amqp://guest:guest@127.0.0.1:5672// = RabbitMQ, shared by several `ihehub worker` processes.
# $IHEHUB_BROKER overrides it (an empty value means null).
broker: null

# RabbitMQ queue names are <queue_prefix>.<channel>.<destination>.  Every process of one deployment
# must use the same prefix; two deployments sharing a broker (and vhost) must use different ones.
queue_prefix: ihehub

# Documents, images and other payload files.
data_dir: data

# The node's private CA and server certificate (PEM), created on first start if missing and
# never overwritten.  Replace them with your hospital's PKI files if you have one.
tls:
  ca: tls/ca.pem             # CA certificate: trusts peers' client certificates
  cert: tls/server.pem       # this node's certificate (server and client authentication)
  key: tls/server-key.pem    # its private key (mode 0600)
  ca_key: tls/ca-key.pem     # the CA's private key; only needed to issue certificates

# Default listeners of the IHE actors.
actors:
  mllp:
    port: 2575               # HL7 v2 over MLLP (PIX/PDQ, ADT)
  dicom:
    enabled: true            # the DICOM image manager: Verification, Storage, C-FIND
    port: 11112              # DICOM storage, query/retrieve, worklist
    ae_title: IHEHUB         # this node's AE title: 1-16 characters, no backslash
    nodes: {}                # peers, name: {ae_title, host, port, tls}: C-MOVE destinations, dicom://name
    study_quiet_seconds: 30  # a study is complete once quiet this long (XDS-I.b publication, routing)
    routing_tags: []         # extra attributes in study-complete messages: [BodyPartExamined, "(0018,1030)"]
    tls_port: null           # DICOM over TLS (e.g. 2762) with the node's certificate (tls/); null = off
    require_client_cert: true  # on the TLS port: clients need a certificate of this node's CA
    dicomweb:                # /dicomweb (QIDO-RS, WADO-RS, STOW-RS) and /wado (WADO-URI) on the HTTP port
      cors_origins: []       # browser viewers allowed to call it (CORS): [https://viewer.example]; ["*"] any
      cache_mb: 1024         # disk cache of rendered frames (data_dir/dicomweb-cache); 0 turns it off
      stow_max_mb: 2048      # largest STOW-RS request body
      prefetch: true         # after a series' first rendered frame, render the rest in the background
      prerender: true        # render new studies in the background, so viewers read frames from the cache
      default_quality: 90    # JPEG quality of rendered images without quality=
    empi:                    # with an EMPI in the hub (pix-manager channel): studies follow links and merges
      enabled: true          # link the index's patients (Patient ID + Issuer) to the EMPI's patients
      default_issuer: ""     # EMPI domain of a Patient ID without Issuer of Patient ID, e.g. HOSPA
      unknown: wait          # a patient the EMPI does not know: wait for its feed, or register (from DICOM)
      cross_domain: false    # true: a query in one domain finds the patient's studies of every domain
      retry_seconds: 60      # patients that could not be resolved (EMPI error, no domain) are tried again
      demographics: true     # answer linked patients with the EMPI's name, birth date, sex (not the files')
  syslog:
    tls_port: 6514           # ATNA audit records over TLS (RFC 5425)
    udp_port: 5140           # ATNA audit records over UDP (RFC 5426)
  xds:                       # XDS.b registry + repository: POST /xds/registry, /xds/repository (HTTP port)
    enabled: true
    repository_unique_id: 1.3.6.1.4.1.21367.2017.2.3.4242.1   # IHE test arc; use your own OID
    home_community_id: null  # urn:oid:... of this community, if any
    max_results: 1000        # ITI-18: more matches -> XDSTooManyResults
    patient_check: null      # empi (ids must be known to the EMPI), none; null = empi when one runs
    registry_url: null       # ITI-41 registers with this external registry (ITI-42); null = the hub's own
    imaging:                 # XDS-I.b Imaging Document Source: each complete study's KOS (RAD-68), RAD-69
      enabled: false         # true needs source_id; see docs/xds.md
      source_id: null        # XDSSubmissionSet.sourceId: your OID
      auto_publish: true     # publish when a study is complete (else: ihehub xds publish --study UID)
      default_domain: null   # assigning authority OID of DICOM Patient IDs whose issuer is not mapped
      issuers: {}            # Issuer of Patient ID (0010,0021) -> assigning authority OID
      retrieve_ae_title: null  # in the manifest; null = actors.dicom.ae_title
      wado_url: null         # DICOMweb base for the manifest's Retrieve URL, e.g. https://hub/dicomweb
      institution: null      # authorInstitution and Institution Name of the manifests
      codes:                 # the affinity domain's codes: [code, codingScheme, displayName]
        class_code: ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"]
        type_code: ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"]
        confidentiality_code: ["N", "2.16.840.1.113883.5.25", "normal"]
        healthcare_facility_type_code: ["22232009", "2.16.840.1.113883.6.96", "Hospital"]
        practice_setting_code: ["394914008", "2.16.840.1.113883.6.96", "Radiology"]
        content_type_code: ["18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"]
        language_code: zh-CN

# Default retry policy of every destination (a channel's destination may override it with retry:).
# The wait after the n-th failure is initial_backoff * multiplier^(n-1), capped at max_backoff,
# spread by +/- jitter (a fraction); after max_attempts the message goes to dead letters.
delivery:
  max_attempts: 10
  initial_backoff: 1.0       # seconds
  max_backoff: 300.0         # seconds
  multiplier: 2.0
  jitter: 0.2
  lease_seconds: 30          # a worker holds a message this long before another may take it over

# Group commit: messages that arrive while a commit is in flight share the next one (one fsync
# for many).  group_commit_ms > 0 also waits that long for more: fewer fsyncs on a slow disk, more
# latency for a lone sender.  A message is stored before it is acknowledged either way.
store:
  group_commit_ms: 0
  max_batch: 500

# Message bodies older than body_days are pruned, their metadata kept; 0 keeps them forever.
retention:
  body_days: 30

# Audit Record Repository (IHE ITI-20): syslog over TLS and UDP on the actors.syslog ports, stored with
# a hash chain (ihehub audit verify).  Received messages are validated against the DICOM audit schema
# and the connectathon Schematron rules when these files exist (put them there; without them,
# messages are stored unvalidated and a warning says so).
atna:
  enabled: true
  schema: atna/dicom2017c.xsd     # DICOM PS3.15 audit message XSD
  schematron: atna/schematron     # <transaction>/<EventID>/*.sch
  require_client_cert: optional   # true, false or optional (TLS listener)
  tcp_port: null                  # a plain TCP (RFC 6587) listener too, e.g. 6515; null = none
  max_frame: 1048576              # bytes; a larger syslog frame is refused
  workers: 0                      # processes validating received audits (one per core for throughput)
  retention_days: 0               # prune older audit records (the chain stays verifiable); 0 = keep
  enterprise_site: null           # AuditEnterpriseSiteID of this node's own audit messages
  # Other repositories this node's audits also go to (kept in the database until sent, retried):
  # - {url: "syslog+tls://arr.example:6514", name: arr}   # + ca/cert/key (default: this node's)
  # syslog+tcp:// (RFC 6587 octet counting) and syslog+udp:// (RFC 5426) too.
  repositories: []
  outbox_max_backoff: 60          # seconds: longest wait between reconnections to a repository
  outbox_expire_hours: 168        # undelivered by then: dead (ihehub audit outbox --dead); 0 = never
  outbox_keep_sent_hours: 24      # delivered audits are purged after this; 0 = at once
  outbox_alert_after: 900         # seconds: /healthz degraded while a queued audit is older; 0 = never

# Consistent Time (IHE ITI-1): NTP servers ("host" or "host:port"); none = off.  The offset, jitter and
# last sync show in /healthz and /metrics; an offset beyond threshold is logged and audited.
time:
  servers: []
  interval: 64                    # seconds between polls
  threshold: 1.0                  # seconds

# Bearer tokens on the API.  false only on a development machine.
auth:
  required: true

# debug, info, warning, error or critical.
log_level: info
"""

HL7_INBOUND_YAML = """\
# A channel: one source, an optional filter and transformer, and the destinations it feeds.
# One channel per file; the channel's name is the file name without .yaml unless name: is set.
# Checked against ihehub/config/schemas/channel.json and the connector's own options schema.

description: HL7 v2 messages received over MLLP; stored, browsable, and archived as files
enabled: true

source:
  url: mllp://0.0.0.0:2575   # the scheme picks the connector: mllp, mllps, http, https, file
  options: {}                # connector options (see docs/configuration.md)

filter: null                 # null = every message; or an expression, or a list that must all hold
transformer: null            # null = pass through; or "package.module:function"
fifo: false                  # true = deliver in arrival order per destination (a retry blocks the rest)
dedup: false                 # true = drop a second message with the same control id (MSH-10)

destinations:
  # Every message is also written to data/hl7-archive/ as a file: a destination you can watch work,
  # and resend to (ihehub messages resend ID, or POST /api/messages/ID/resend).  Replace it with your
  # RIS/PACS (http://, mllp://) or remove it to only store and browse.
  - name: archive
    url: file:data/hl7-archive
    options:
      filename: "{date}-{control_id}-{id}.{ext}"
      overwrite: true          # a resend writes the file again
"""

ADT_TO_RIS_YAML = """\
# An example channel, disabled: set enabled: true to forward ADT messages to a RIS over HTTP.
# name defaults to the file name (adt-to-ris); it must be unique across channels/.

name: adt-to-ris
description: ADT feed from the HIS, forwarded to the RIS
enabled: false

source:
  url: mllp://0.0.0.0:2576   # its own port: hl7-inbound already listens on 2575
  options: {}

filter: 'MSH-9.1 == "ADT"'   # only ADT messages; a list of expressions means all must hold
transformer: null
fifo: true                   # a RIS expects A01 before A08 of the same patient
dedup: true                  # a resent message (same MSH-10) is stored once

destinations:
  - name: ris
    url: http://127.0.0.1:9000/adt
    options: {}
    filter: null
    retry:                   # overrides delivery: of ihehub.yaml for this destination only
      max_attempts: 20
      max_backoff: 600.0
"""

# (file name, text) pairs; the channel files are written only when channels/ is created.
DEFAULT_CHANNELS: tuple[tuple[str, str], ...] = (
    ("hl7-inbound.yaml", HL7_INBOUND_YAML),
    ("adt-to-ris.yaml", ADT_TO_RIS_YAML),
)
