"""Patient events to listeners: the ``listeners:`` of a PIX Manager channel (webhook, SOAP, database outbox,
AMQP, MLLP A31/A40), published from the EMPI's ``empi_events`` outbox through the bus (channel
``empi-events``, one destination queue per listener).  See `config` (the kinds), `publisher` (the outbox
follower), `listeners` (the destination connectors)."""

from ihehub.actors.events.config import CHANNEL, KINDS, Listener, ListenerError, parse_listeners

# publisher and listeners import ihehub.actors.hl7v2, which imports config from here: import them directly
__all__ = ["CHANNEL", "KINDS", "Listener", "ListenerError", "parse_listeners"]
