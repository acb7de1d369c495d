"""IHE actors bound to channels: each handles a stored message and builds the reply (see `base`)."""

from ihehub.actors.base import Actor, ActorContext
from ihehub.actors.registry import ACTORS, ActorError, build_actor, resolve_actor

__all__ = ["ACTORS", "Actor", "ActorContext", "ActorError", "build_actor", "resolve_actor"]
