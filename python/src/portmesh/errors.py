"""Errors: the node's message, and its category as a class to catch."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Type


class PortmeshError(Exception):
    """A portmesh call failed. `kind` is the node's category (`exhausted`, `not_found`,
    `failed_precondition`, `unreachable`, ...); the message is the node's own, which says what
    to do."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class PoolExhausted(PortmeshError):
    """Every port of the pool is taken (`kind` `exhausted`)."""


class FailedPrecondition(PortmeshError):
    """The state does not allow it now: a pool still in use, a port allocated before it is
    reserved, ... (`kind` `failed_precondition`)."""


class PortUnavailable(FailedPrecondition):
    """The port asked for cannot be had: taken, reserved, busy on the host, or outside the pools
    (`kind` `failed_precondition`)."""


class NotFound(PortmeshError):
    """An unknown pool, lease, key, port or service (`kind` `not_found`)."""


class InvalidArgument(PortmeshError):
    """A bad name, port, TTL or other input; the message names the field (`kind`
    `invalid_argument`)."""


class NodeUnreachable(PortmeshError):
    """No node answered (`kind` `unreachable`)."""


class Unauthorized(PortmeshError):
    """The cluster wants a token, or a token with more rights (`kind` `unauthorized`)."""


class OutcomeUnknown(PortmeshError):
    """A write reached a node that then stopped answering: it may have been applied (`kind`
    `outcome_unknown` or `timeout`)."""


_BY_KIND: Dict[str, Type[PortmeshError]] = {
    "exhausted": PoolExhausted,
    "failed_precondition": FailedPrecondition,
    "not_found": NotFound,
    "invalid_argument": InvalidArgument,
    "unreachable": NodeUnreachable,
    "unauthorized": Unauthorized,
    "unauthenticated": Unauthorized,
    "permissiondenied": Unauthorized,
    "outcome_unknown": OutcomeUnknown,
    "timeout": OutcomeUnknown,
}


def error_for(message: str, kind: str) -> PortmeshError:
    """The exception for a failure the CLI reported."""
    if kind == "failed_precondition" and message.startswith("port ") and (
        " is not available" in message or " is outside the pools" in message or " is not in pool " in message
    ):
        return PortUnavailable(message, kind)
    return _BY_KIND.get(kind, PortmeshError)(message, kind)
