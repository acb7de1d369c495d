"""The running hub — the composition root: store, channels, delivery and the HTTP app in one process.

It sits above every layer (it builds the API app, which reads the hub), and only the CLI imports it.

``ihehub serve`` runs a `Hub` with every listener.  In the embedded default (no ``broker:``)
the same process also delivers, with one `LeaseDispatcher` per destination queue.  In scale-out
mode (``broker: amqp://...``) the serve process only receives and hands queued deliveries to
RabbitMQ (the outbox in `ihehub.bus.amqp`); ``ihehub worker`` processes deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.bus.store import MessageStore, queue_name
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.config.model import ChannelConfig, HubConfig
from ihehub.engine.dispatch import Deliverer, LeaseDispatcher
from ihehub.engine.expr import Filter
from ihehub.engine.metrics import HubMetrics
from ihehub.engine.pipeline import ChannelPrep, ChannelRuntime, DestinationRuntime, load_callable, reprocess

log = logging.getLogger("ihehub.hub")


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


class Hub:
    """One node.  ``role`` is ``serve`` (sources, API, and delivery when embedded) or ``worker``."""

    def __init__(
        self,
        cfg: HubConfig,
        channels: Sequence[ChannelConfig],
        *,
        registry: Registry | None = None,
        role: str = "serve",
        serve_http: bool = True,
        worker_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.channel_configs = {c.name: c for c in channels}
        self.registry = registry or Registry()
        self.role = role
        self.serve_http = serve_http and role == "serve"
        self.worker_id = worker_id or default_worker_id(role)
        self.metrics = HubMetrics()
        self.started_at = time.time()
        self.engine = make_engine(cfg.database, home=cfg.home)
        self.writer = Writer(self.engine, max_batch=cfg.store.max_batch, linger_ms=cfg.store.group_commit_ms)
        self.store = MessageStore(self.engine, self.writer, worker_id=self.worker_id)
        self.runtimes: dict[str, ChannelRuntime] = {}
        self.destinations: dict[str, DestinationRuntime] = {}  # by queue name
        self.dispatchers: dict[str, LeaseDispatcher] = {}
        self.deliverer: Deliverer | None = None
        self.routes: Any = None
        self.http_server: Any = None
        self.outbox: Any = None
        self.consumer: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()  # fire-and-forget work (pre-rendering), kept referenced
        self._stopping = asyncio.Event()
        self.errors: dict[str, str] = {}  # channel -> why it is not running
        self.actors: dict[str, Any] = {}  # channel -> its IHE actor
        self._built_actors: dict[str, Any] = {}  # built by the destinations hook, started by _start_actors
        self.actor_queues: dict[str, list[str]] = {}  # message channel -> destinations an actor declared
        self.services: dict[str, Any] = {}  # domain services handed to actors (ActorContext.extras)
        self.audit: Any = None  # ihehub.atna.AuditContext when the repository runs
        self.dicom: Any = None  # ihehub.dicom.ImageManager when enabled
        self.mappings: Any = None  # ihehub.mappings.MappingSet, hot-reloading the channels' mapping files
        self.audit_store: Any = None
        self.audit_repo: Any = None
        self.audit_forwarder: Any = None  # ihehub.atna.forward.AuditForwarder when atna.repositories are set
        self.time_client: Any = None  # ihehub.atna.timeclient.TimeClient when time.servers are set (ITI-1)

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(schema.upgrade, self.engine)
        self.writer.start()
        self.metrics.watch_queues(self.store.queue_depths)
        if self.serve_http:
            from ihehub.channels.http import RouteTable

            self.routes = RouteTable(port=self.cfg.http.port or None)  # port 0: ephemeral, never "the same"
        if self.role == "serve" and self.cfg.atna.enabled:
            await self._start_atna()
        if self.role == "serve" and self.cfg.time.servers:
            await self._start_time()
        if self.role == "serve" and self.cfg.actors.dicom.enabled:
            from ihehub.dicom import ImageManager

            server_ctx, client_ctx = self._dicom_tls()
            self.dicom = ImageManager(self.cfg.actors.dicom, self.writer, self.cfg.data_dir,
                                      on_study_complete=self._study_complete, ssl_context=server_ctx,
                                      client_ssl_context=client_ctx, audit=self.audit)
            await self.dicom.start()
            self.services["dicom"] = self.dicom
        elif self.role != "serve" and self.cfg.actors.dicom.enabled:
            from ihehub.dicom.server import NodeDirectory

            # a worker delivers dicom://NODE and STOW-RS forwards: the nodes, AE title and storage folder
            self.services["dicom_nodes"] = NodeDirectory.from_config(self.cfg.actors.dicom, self.cfg.data_dir)
        context = ConnectorContext(home=str(self.cfg.home), tls=_tls_dict(self.cfg), http_routes=self.routes,
                                   on_security_event=self.security_event, on_source_status=self.source_status,
                                   services=self.services)
        self._context = context
        for ch in self.channel_configs.values():
            for d in ch.destinations:
                q = queue_name(ch.name, d.name)
                self.destinations[q] = DestinationRuntime(
                    name=d.name, queue=q,
                    connector=self.registry.build_destination(
                        name=q, url=d.url, options=d.options, context=context),
                    filter=Filter.compile(list(d.filter)), retry=d.retry,
                    concurrency=1 if ch.fifo else 4,
                )
        self._add_actor_destinations(context)
        self._add_imaging_destination(context)
        self.deliverer = Deliverer(self.store, self.destinations, self.metrics)
        if self.cfg.broker is None:
            if self.role == "serve":
                for q in self.destinations:
                    fifo = self._fifo(q)
                    disp = LeaseDispatcher(self.deliverer, q, fifo=fifo,
                                           lease_seconds=self.cfg.delivery.lease_seconds)
                    disp.start()
                    self.dispatchers[q] = disp
        else:
            from ihehub.bus import amqp

            fifo_queues = {q for q in self.destinations if self._fifo(q)}
            if self.role == "serve":
                # the outbox declares the queues too, so it must know which are single-active-consumer
                self.outbox = amqp.Outbox(self.cfg.broker, self.store, fifo_queues=fifo_queues,
                                          prefix=self.cfg.queue_prefix)
                self.outbox.start()
            else:
                self.consumer = amqp.Consumer(self.cfg.broker, self.store, self.deliverer,
                                              queues=list(self.destinations), fifo_queues=fifo_queues,
                                              lease_seconds=self.cfg.delivery.lease_seconds,
                                              prefix=self.cfg.queue_prefix)
                self.consumer.start()
        self._start_xds()
        if self.role == "serve":
            await self._start_actors()
            self._link_dicom_patients()
            overrides = await asyncio.to_thread(self.store.channel_overrides)
            for ch in self.channel_configs.values():
                if overrides.get(ch.name, ch.enabled):
                    try:
                        await self.start_channel(ch.name, persist=False)
                    except Exception:  # reported by channel_status / healthz; the other channels run
                        continue
            if self.serve_http:
                await self._start_http()
            self._tasks.append(asyncio.create_task(self._control_loop(), name="control"))
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        log.info("hub %s started (%s, %s, %d channels)", self.cfg.node_id, self.role,
                 "embedded queue" if self.cfg.broker is None else "RabbitMQ", len(self.runtimes))

    def _start_xds(self) -> None:
        """XDS.b registry + repository (POST /xds/registry, /xds/repository) and, with ``actors.xds.imaging``,
        the XDS-I.b Imaging Document Source (RAD-68 publisher, RAD-69 at /xds/imaging).  Workers build them
        too: they deliver the ``dicom-studies/xds-i`` publications."""
        x = self.cfg.actors.xds
        if not x.enabled:
            return
        from ihehub.actors.xds import build_xds_service

        self.services["xds"] = build_xds_service(self.cfg, self.engine, self.services)
        if x.imaging and x.imaging.get("enabled"):
            from ihehub.actors.xds_imaging import ImagingDocumentSource, ImagingSettings

            dicom = self.cfg.actors.dicom
            self.services["xds_imaging"] = ImagingDocumentSource(
                engine=self.engine, dicom_root=self.cfg.data_dir / "dicom", xds=self.services["xds"],
                settings=ImagingSettings.from_mapping(x.imaging, ae_title=dicom.ae_title), services=self.services)

    def _link_dicom_patients(self) -> None:
        """With both the image manager and an EMPI in this hub: the index's patients follow the EMPI (links,
        merges; ``actors.dicom.empi``, docs/dicom.md "Patients and the EMPI")."""
        empi = self.services.get("empi")
        if self.dicom is None or empi is None:
            return
        from ihehub.actors.dicom_empi import link_image_manager

        try:
            link_image_manager(self.dicom, empi, self.cfg.actors.dicom.empi, self.writer)
        except Exception as exc:  # the image manager runs unlinked and says why
            log.error("dicom: patients are not linked to the EMPI: %s", exc)

    def _add_imaging_destination(self, context: ConnectorContext) -> None:
        """``dicom-studies/xds-i``: each study-complete message of the image manager is published (RAD-68)
        through the bus (retried, dead-lettered, resendable), unless a channel named ``dicom-studies`` takes
        those messages (it then lists ``xdsi://publish`` itself)."""
        x = self.cfg.actors.xds
        if not (x.enabled and x.imaging and x.imaging.get("enabled") and x.imaging.get("auto_publish", True)) or \
                "dicom-studies" in self.channel_configs:
            return
        queue = "dicom-studies/xds-i"
        self.destinations[queue] = DestinationRuntime(
            name="xds-i", queue=queue, filter=None, retry=self.cfg.delivery.retry, concurrency=1,
            connector=self.registry.build_destination(name=queue, url="xdsi://publish", options={},
                                                      context=context))
        self.actor_queues.setdefault("dicom-studies", []).append("xds-i")

    def _fifo(self, queue: str) -> bool:
        channel, _, dest = queue.partition("/")
        ch = self.channel_configs.get(channel)
        return ch.fifo if ch is not None else dest in self.actor_queues.get(channel, ())

    def _add_actor_destinations(self, context: ConnectorContext) -> None:
        """The actor-destination hook: an actor with ``destinations() -> [(queue, url, options)]`` (the PIX
        Manager's ITI-10 consumers, queue ``<channel>-iti10/<consumer>``; ``url`` may be a built connector, as
        for its patient-event listeners, queue ``empi-events/<listener>``) gets them built here, before the
        dispatchers, so the embedded queue and the scale-out workers deliver, retry and resend them like a
        channel's (FIFO: one at a time, in order; the hub's ``delivery:`` retry policy).  A bad declaration
        keeps that actor's channel down with the reason; the others run."""
        if not any(ch.actor for ch in self.channel_configs.values()):
            return
        from ihehub.actors import ActorContext
        from ihehub.actors.registry import resolve_actor

        actx = ActorContext(node_id=self.cfg.node_id, store=self.store, config=self.cfg, extras=self.services)
        for ch in self.channel_configs.values():
            if not ch.actor:
                continue
            try:
                cls = resolve_actor(ch.actor)
                if not callable(getattr(cls, "destinations", None)):
                    continue  # only actors that declare destinations are built (not started) here
                actor = cls(name=ch.name, options=dict(ch.actor_options), context=actx)
                self._built_actors[ch.name] = actor  # _start_actors starts this instance, not a second one
                built = {}
                for queue, url, options in actor.destinations():
                    channel, _, dest = queue.partition("/")
                    if not dest or queue in self.destinations or queue in built or channel in self.channel_configs:
                        raise ValueError(f"destination queue {queue!r} is not a new '<channel>/<name>'")
                    built[queue] = DestinationRuntime(
                        name=dest, queue=queue, filter=None, retry=self.cfg.delivery.retry, concurrency=1,
                        connector=url if not isinstance(url, str) else self.registry.build_destination(
                            name=queue, url=url, options=options, context=context))  # or a built connector
            except Exception as exc:  # the channel stays down and says why (start_channel refuses it)
                self.errors[ch.name] = f"actor {ch.actor!r}: {exc}"
                log.error("channel %s: actor %s destinations: %s", ch.name, ch.actor, exc)
                continue
            for queue, runtime in built.items():
                self.destinations[queue] = runtime
                channel, _, dest = queue.partition("/")
                self.actor_queues.setdefault(channel, []).append(dest)

    def _dicom_tls(self) -> tuple[Any, Any]:
        """(server, client) TLS contexts of the image manager: the server one for ``actors.dicom.tls_port``
        (PS3.15 B.1 Secure Transport, client certificates verified against the node's CA), the client one for
        C-MOVE to nodes with ``tls: true`` (this node's certificate).  None where the files are missing."""
        from ihehub.tls import client_ssl_context, server_ssl_context

        tls, dicom = self.cfg.tls, self.cfg.actors.dicom
        if not (tls.cert.is_file() and tls.key.is_file()):
            if dicom.tls_port is not None:
                raise RuntimeError(f"actors.dicom.tls_port is set but there is no TLS certificate at {tls.cert}")
            return None, None
        ca = tls.ca if tls.ca.is_file() else None
        server = server_ssl_context(tls.cert, tls.key, ca, dicom.require_client_cert) \
            if dicom.tls_port is not None else None
        return server, client_ssl_context(ca, tls.cert, tls.key)

    async def _start_atna(self) -> None:
        """The Audit Record Repository on the actors.syslog ports and this node's audit context."""
        import getpass

        from ihehub.atna import AuditContext, AuditRepository, AuditStore, Endpoint, Validator
        from ihehub.tls import server_ssl_context

        atna = self.cfg.atna
        self.audit_store = AuditStore(self.engine, self.writer)
        validator = None
        if atna.schema.is_file():
            validator = await asyncio.to_thread(
                Validator, atna.schema, atna.schematron if atna.schematron.is_dir() else None)
        else:
            log.warning("atna: no audit schema at %s: received audit messages are stored unvalidated", atna.schema)
        ssl_context = None
        tls = self.cfg.tls
        if tls.cert.is_file() and tls.key.is_file():
            req = atna.require_client_cert
            ssl_context = server_ssl_context(tls.cert, tls.key, tls.ca, True if req is True else
                                             (None if req == "optional" else False))
        else:
            log.warning("atna: no TLS certificate at %s: the TLS (RFC 5425) listener is off", tls.cert)
        syslog = self.cfg.actors.syslog
        self.audit_repo = AuditRepository(self.audit_store, validator, max_frame=atna.max_frame,
                                          on_security_event=self.security_event, workers=atna.workers)
        await self.audit_repo.start(tls_port=syslog.tls_port if ssl_context else None, udp_port=syslog.udp_port,
                                    tcp_port=atna.tcp_port, ssl_context=ssl_context)
        sinks = [self.audit_repo.sink]
        if atna.repositories:  # and to other repositories, through the persistent queue
            from ihehub.atna.forward import AuditForwarder, repositories_from_config

            self.audit_forwarder = AuditForwarder(
                self.engine, self.writer, repositories_from_config(
                    atna.repositories, home=self.cfg.home, ca=tls.ca, cert=tls.cert, key=tls.key),
                max_backoff=atna.outbox_max_backoff, expire_after=atna.outbox_expire_hours * 3600.0,
                keep_sent=atna.outbox_keep_sent_hours * 3600.0)
            await self.audit_forwarder.start()
            self.metrics.registry.register(self.audit_forwarder)
            sinks.append(self.audit_forwarder.sink)
        self.audit = AuditContext(source_id=self.cfg.node_id, enterprise_site=atna.enterprise_site,
                                  sinks=tuple(sinks))
        self.services["audit"] = self.audit
        self.audit.emit("APP-START", user=Endpoint(user_id=getpass.getuser()))

    async def _start_time(self) -> None:
        """The Consistent Time client (ITI-1): offset, jitter and last sync in /healthz and /metrics."""
        from ihehub.atna.timeclient import TimeClient

        t = self.cfg.time
        self.time_client = TimeClient(t.servers, interval=t.interval, threshold=t.threshold,
                                      on_alert=self._time_alert)
        self.metrics.registry.register(self.time_client)
        await self.time_client.start()

    def _time_alert(self, text: str, recovered: bool) -> None:
        """The clock drifted beyond the CT threshold: audit it (DCM 110113 Security Alert); the client logs."""
        if self.audit is not None and not recovered:
            self.audit.emit("SECURITY-ALERT", alert="security-configuration", subject=self.cfg.node_id,
                            detail=text, outcome=4)

    async def _study_complete(self, event: Any) -> None:
        """A study went quiet: record it on the bus (channel ``dicom-studies``) for XDS-I.b, routing and film to pick
        up; with a channel ``dicom-series``, one series-complete message per series goes there too."""
        import dataclasses
        import json

        from ihehub.bus.message import Message

        body = json.dumps(dataclasses.asdict(event), default=str, ensure_ascii=False).encode()
        msg = Message(channel="dicom-studies", raw=body, content_type="application/json", charset="utf-8",
                      control_id=event.study_uid, message_type="study-complete")
        web = self.services.get("dicomweb")
        if web is not None and web.settings.prerender:  # rendered frames ready before the first viewer asks
            task = asyncio.create_task(asyncio.to_thread(web.prerender_study, event.study_uid),
                                       name=f"prerender {event.study_uid}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        series_channel = self.runtimes.get("dicom-series")
        if series_channel is not None:  # routing by series: one series-complete message per series of the study
            from ihehub.dicom.routing import series_messages

            for item in series_messages(dataclasses.asdict(event)):
                one = Message(channel="dicom-series", content_type="application/json", charset="utf-8",
                              raw=json.dumps(item, default=str, ensure_ascii=False).encode(),
                              control_id=item["series_uid"], message_type="series-complete")
                outcome = await series_channel.inbound(one)
                if not outcome.accepted:
                    log.error("dicom: channel dicom-series refused series-complete for %s: %s", item["series_uid"],
                              outcome.error)
        runtime = self.runtimes.get("dicom-studies")
        if runtime is not None:  # a channel of that name: its filter, transformer and destinations (dicom://) apply
            outcome = await runtime.inbound(msg)
            if not outcome.accepted:
                log.error("dicom: channel dicom-studies refused study-complete for %s: %s", event.study_uid,
                          outcome.error)
            return
        try:
            await self.store.append(msg, self.actor_queues.get("dicom-studies", ()))
        except Exception as exc:
            log.error("dicom: could not record study-complete for %s: %s", event.study_uid, exc)

    def source_status(self, channel: str, error: str | None) -> None:
        """A running polling source (sql://, sftp://, amqp://) says what stops it, or (None) that it works again."""
        if error is None:
            self.errors.pop(channel, None)
        else:
            self.errors[channel] = error

    def security_event(self, kind: str, peer: str, detail: str) -> None:
        """A refused TLS handshake, client certificate or token: log and audit (DCM 110113 Security Alert)."""
        log.warning("security: %s from %s: %s", kind, peer, detail)
        if self.audit is not None:
            self.audit.emit("SECURITY-ALERT", subject=peer, detail=f"{kind}: {detail}", outcome=4)

    async def _start_actors(self) -> None:
        if not any(ch.actor for ch in self.channel_configs.values()):
            return  # the actor and domain packages (EMPI: pypinyin, numpy) cost ~100 MB; import only when used
        from ihehub.actors import ActorContext, build_actor
        from ihehub.actors.hl7v2 import EMPI_ACTORS, empi_config

        self.services["wake"] = self.wake  # actors queueing their own messages (ITI-10) wake the dispatchers
        context = ActorContext(node_id=self.cfg.node_id, store=self.store, config=self.cfg, extras=self.services)
        for ch in self.channel_configs.values():
            if ch.actor in EMPI_ACTORS and "empi" not in self.services:  # one EMPI for every PIX/PDQ channel
                from ihehub.empi import Empi

                try:
                    self.services["empi"] = Empi(self.engine, empi_config(ch.actor_options), writer=self.writer)
                except Exception as exc:
                    self.errors[ch.name] = f"actor {ch.actor!r}: EMPI settings: {exc}"
                    continue
            if ch.actor and ch.name not in self.errors:
                try:
                    actor = self._built_actors.pop(ch.name, None) or build_actor(
                        ch.actor, channel=ch.name, options=ch.actor_options, context=context)
                    await actor.start()
                except Exception as exc:  # the channel stays down and says why; the others run
                    self.errors[ch.name] = f"actor {ch.actor!r}: {exc}"
                    log.error("channel %s: actor %s could not start: %s", ch.name, ch.actor, exc)
                    continue
                self.actors[ch.name] = actor

    async def stop(self) -> None:
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        if self.time_client is not None:
            await self.time_client.stop()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for rt in list(self.runtimes.values()):
            with contextlib.suppress(Exception):
                await rt.stop()
        if self.http_server is not None:
            self.http_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=10)
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                await actor.stop()
        if self.dicom is not None:
            with contextlib.suppress(Exception):
                await self.dicom.stop()
        for disp in self.dispatchers.values():
            await disp.stop()
        if self.outbox is not None:
            await self.outbox.stop()
        if self.consumer is not None:
            await self.consumer.stop()
        for d in self.destinations.values():
            with contextlib.suppress(Exception):
                await d.connector.close()
        if self.audit_repo is not None:
            import getpass

            from ihehub.atna import Endpoint

            self.audit.emit("APP-STOP", user=Endpoint(user_id=getpass.getuser()))
            if self.audit_forwarder is not None:
                await self.audit_forwarder.stop()
            with contextlib.suppress(Exception):
                await self.audit_repo.stop()
            await asyncio.to_thread(self.audit_store.close)
        await asyncio.to_thread(self.writer.close)
        self.engine.dispose()
        log.info("hub %s stopped", self.cfg.node_id)

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    # -- channels ----------------------------------------------------------------------------
    def _build_runtime(self, ch: ChannelConfig) -> ChannelRuntime:
        source = self.registry.build_source(
            name=ch.name, url=ch.source.url, options=ch.source.options, context=self._context)
        actor = self.actors.get(ch.name)
        transformer = load_callable(ch.transformer) if ch.transformer else None
        if ch.mapping:
            if self.mappings is None:
                from ihehub.mappings import MappingSet

                self.mappings = MappingSet(self.cfg.home)
            transformer = self.mappings.transformer(ch.mapping)  # ConfigError (file:line) keeps the channel down
        return ChannelRuntime(
            name=ch.name, source=source, store=self.store,
            destinations=[self.destinations[queue_name(ch.name, d.name)] for d in ch.destinations],
            filter=Filter.compile(list(ch.filter)),
            transformer=transformer,
            dedup=ch.dedup, fifo=ch.fifo, metrics=self.metrics, on_queued=self.wake,
            handler=actor.handle if actor is not None else None,
        )

    async def start_channel(self, name: str, *, persist: bool = True, by: str = "") -> None:
        ch = self.channel_configs[name]
        if persist:
            await asyncio.to_thread(self.store.set_channel_enabled, name, True, by)
        rt = self.runtimes.get(name)
        if rt is not None and rt.running:
            return
        if ch.actor and name not in self.actors:  # never run an actor channel without its actor
            raise RuntimeError(self.errors.get(name, f"channel {name}: actor {ch.actor!r} is not running"))
        try:
            rt = self._build_runtime(ch)
            await rt.start()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("channel %s could not start: %s", name, exc)
            raise
        self.errors.pop(name, None)
        self.runtimes[name] = rt

    async def stop_channel(self, name: str, *, persist: bool = True, by: str = "") -> None:
        if name not in self.channel_configs:
            raise KeyError(name)
        if persist:
            await asyncio.to_thread(self.store.set_channel_enabled, name, False, by)
        rt = self.runtimes.pop(name, None)
        if rt is not None:
            await rt.stop()

    def channel_status(self, name: str) -> str:
        rt = self.runtimes.get(name)
        if rt is not None and rt.running:
            return "started"
        if name in self.errors:
            return "error"
        return "stopped"

    def wake(self, queues: Sequence[str] | None = None) -> None:
        targets = self.dispatchers.values() if queues is None else (
            self.dispatchers[q] for q in queues if q in self.dispatchers)
        for d in targets:
            d.wake()
        if self.outbox is not None:
            self.outbox.wake()

    def channel_destinations(self) -> dict[str, list[str]]:
        out = {c.name: [d.name for d in c.destinations] for c in self.channel_configs.values()}
        return out | {ch: list(ds) for ch, ds in self.actor_queues.items()}  # actor-declared (ITI-10)

    def resend(self, message_ids: Sequence[str], destinations: Sequence[str] | None = None) -> int:
        return self.requeue(message_ids, destinations)[0]

    def requeue(self, message_ids: Sequence[str], destinations: Sequence[str] | None = None,
                ) -> tuple[int, dict[str, str]]:
        """Resend: a message that has deliveries is queued again to them (or to ``destinations``); one that
        never had any (its transformer failed, a filter dropped it) runs through its channel again, with
        the channel's current mapping and filters (`ihehub.engine.pipeline.reprocess`).  Returns
        (deliveries queued, {message id: why it was not queued})."""
        fresh = self.store.undelivered(message_ids)
        again = [m for m in message_ids if m not in fresh]
        queued = self.store.resend(again, destinations, channel_destinations=self.channel_destinations()) \
            if again else 0
        skipped: dict[str, str] = {}
        if fresh:
            n, skipped = reprocess(self.store, [m for m in message_ids if m in fresh], self.channel_preps(),
                                   only=destinations)
            queued += n
        return queued, skipped

    def channel_preps(self) -> dict[str, ChannelPrep]:
        """Each configured channel's filter, transformer and routed destinations (running or not)."""
        out: dict[str, ChannelPrep] = {}
        for name, ch in self.channel_configs.items():
            rt = self.runtimes.get(name)
            if rt is not None:
                out[name] = rt.prep
                continue
            try:
                if ch.mapping and self.mappings is None:
                    from ihehub.mappings import MappingSet

                    self.mappings = MappingSet(self.cfg.home)
                out[name] = ChannelPrep.from_config(ch, self.cfg.home, self.mappings)
            except Exception as exc:  # a channel that cannot load cannot reprocess: its messages are skipped
                log.warning("channel %s cannot be prepared for a resend: %s", name, exc)
        return out

    # -- background --------------------------------------------------------------------------
    async def _start_http(self) -> None:
        import uvicorn

        from ihehub.api.app import create_app

        app = create_app(self)
        config = uvicorn.Config(app, host=self.cfg.http.host, port=self.cfg.http.port, log_level="warning",
                                lifespan="off", access_log=False)
        server = _EmbeddedServer(config)
        self.http_server = server
        self._http_task = asyncio.create_task(server.serve(), name="http")
        for _ in range(200):
            if server.started or self._http_task.done():
                break
            await asyncio.sleep(0.02)
        if self._http_task.done():
            exc = self._http_task.exception()
            raise RuntimeError(f"HTTP listener on {self.cfg.http.host}:{self.cfg.http.port} failed: {exc}")
        if server.servers and server.servers[0].sockets:
            self.http_port = server.servers[0].sockets[0].getsockname()[1]
        else:
            self.http_port = self.cfg.http.port

    async def _control_loop(self) -> None:
        """Apply channel start/stop requested by other processes (``ihehub channels stop X``)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                overrides = await asyncio.to_thread(self.store.channel_overrides)
            except Exception as exc:
                log.debug("control loop: %s", exc)
                continue
            for name, enabled in overrides.items():
                if name not in self.channel_configs:
                    continue
                running = self.channel_status(name) == "started"
                try:
                    if enabled and not running and name not in self.errors:
                        await self.start_channel(name, persist=False)
                    elif not enabled and running:
                        await self.stop_channel(name, persist=False)
                except Exception as exc:
                    log.error("channel %s: %s", name, exc)

    async def _retention_loop(self) -> None:
        days = self.cfg.retention.body_days
        audit_days = self.cfg.atna.retention_days if self.audit_store is not None else 0
        if days <= 0 and audit_days <= 0:
            return
        while True:
            try:
                if days > 0:
                    n = await asyncio.to_thread(self.store.prune_bodies, days)
                    if n:
                        log.info("retention: pruned bodies of %d messages older than %d days", n, days)
                if audit_days > 0:
                    n = await asyncio.to_thread(self.audit_store.prune, audit_days)
                    if n:
                        log.info("retention: pruned %d audit records older than %d days", n, audit_days)
            except Exception as exc:
                log.warning("retention: %s", exc)
            await asyncio.sleep(3600)


def actor_declared_queues(
    channels: Sequence[ChannelConfig], cfg: HubConfig, store: MessageStore
) -> dict[str, list[str]]:
    """Channel -> destination names that actors declare (e.g. ``pix-iti10`` -> its ITI-10 consumers), for
    processes that resend without running the actors (``ihehub messages resend``).  Bad declarations are
    skipped here; ``ihehub serve`` reports them."""
    if not any(ch.actor for ch in channels):
        return {}
    from ihehub.actors import ActorContext
    from ihehub.actors.registry import resolve_actor

    actx = ActorContext(node_id=cfg.node_id, store=store, config=cfg, extras={})
    out: dict[str, list[str]] = {}
    for ch in channels:
        if not ch.actor:
            continue
        try:
            cls = resolve_actor(ch.actor)
            if not callable(getattr(cls, "destinations", None)):
                continue
            actor = cls(name=ch.name, options=dict(ch.actor_options), context=actx)
            for queue, _url, _options in actor.destinations():
                channel, _, dest = queue.partition("/")
                out.setdefault(channel, []).append(dest)
        except Exception as exc:
            log.debug("actor %s of %s: %s", ch.actor, ch.name, exc)
    return out


class _EmbeddedServer:
    """uvicorn's Server without its signal handling: the hub owns SIGINT/SIGTERM."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

            def install_signal_handlers(self) -> None:
                return None

        return Server(config)


def _tls_dict(cfg: HubConfig) -> dict[str, str]:
    return {"ca": str(cfg.tls.ca), "cert": str(cfg.tls.cert), "key": str(cfg.tls.key)}
