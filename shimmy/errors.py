"""Shimmy's exception hierarchy.

Every error derives from :class:`ShimmyError`.  Where a builtin says the same thing, the error
mixes it in, so a caller may catch that (``TimeoutError``, ``ValueError``, ``ConnectionError``...);
the errors that are Shimmy's own ideas (a closed or retired channel, a protocol fault, a busy
stream or publisher, an overwritten message, a corrupted ring) derive from ShimmyError alone.
The daemon sends errors as ``{"code": CODE, "message": ...}``; :func:`error_from_reply` is the one
place that turns a code back into an exception, so the SDK raises the same class whichever side
found the fault.
"""

from __future__ import annotations

# Each class below is a declaration (its name, builtin, docstring and wire code), so their lines
# look alike, and a checker for repeated code lists them; a factory that made them from a table
# would hide them from the type checker, from ``help()`` and from a reader looking one up.


class ShimmyError(Exception):
    """Base class of every error Shimmy raises."""

    code = "error"


class DaemonUnavailable(ShimmyError, ConnectionError):
    """The node daemon could not be reached (or stopped answering)."""

    code = "daemon_unavailable"


class InvalidName(ShimmyError, ValueError):
    """A channel or stream name breaks the naming rule."""

    code = "invalid_name"


class InvalidArgument(ShimmyError, ValueError):
    """An option or size is out of its documented range."""

    code = "invalid_argument"


class MessageTooLarge(ShimmyError, ValueError):
    """A message is larger than the channel's largest message."""

    code = "message_too_large"
    published = 0  # publish_many: the messages of the batch published before this one


class ChannelConflict(ShimmyError, ValueError):
    """A channel exists with options that differ from the ones asked for."""

    code = "conflict"


class ChannelNotFound(ShimmyError, LookupError):
    """The channel does not exist (and the request did not ask to create it)."""

    code = "not_found"


class LimitExceeded(ShimmyError, OSError):
    """A daemon limit (channels, subscribers, clients, memory) would be exceeded."""

    code = "limit"


class PermissionDenied(ShimmyError, PermissionError):
    """An access rule refused the operation."""

    code = "permission_denied"


class BackpressureTimeout(ShimmyError, TimeoutError):
    """A reliable publisher waited its bound for slow subscribers and gave up."""

    code = "backpressure_timeout"
    written = 0  # stream writes: the bytes that went in before the timeout
    published = 0  # publish_many: the messages of the batch published before the timeout


class ReceiveTimeout(ShimmyError, TimeoutError):
    """No message arrived within the receive timeout."""

    code = "timeout"


class ChannelClosed(ShimmyError):
    """The object was closed by its owner (or belongs to the parent of a forked process), or
    retired by the daemon (:class:`ChannelRetired`)."""

    code = "closed"
    published = 0  # publish_many: the messages of the batch published before the channel closed


class ChannelRetired(ChannelClosed):
    """The daemon retired the channel's ring: it was deleted, or its daemon restarted and swept
    it.  ``Channel.reopen`` opens the channel again (a ChannelClosed, so code written before the
    distinction keeps working)."""

    code = "retired"

    @classmethod
    def of(cls, name: str) -> ChannelRetired:
        """The error for channel ``name``: the one text every retired check raises."""
        return cls(f"channel {name!r} was retired by the daemon (deleted, or the daemon "
                   f"restarted); open it again")


class MessageOverwritten(ShimmyError):
    """A lossy-mode message was overwritten by the publisher while it was held."""

    code = "overwritten"


class ProtocolError(ShimmyError):
    """A control message was malformed or spoke another protocol version."""

    code = "protocol"


class StreamBusy(ShimmyError):
    """A stream end (writer or reader) is already held by another process."""

    code = "stream_busy"


class StreamClosed(ChannelClosed, ValueError):
    """An operation on a stream end that this process already closed (``io``'s ValueError)."""

    code = "stream_closed"


class StreamBroken(ShimmyError, BrokenPipeError):
    """The other end of a stream went away without closing it cleanly."""

    code = "stream_broken"


class PublisherBusy(ShimmyError):
    """The channel's publisher role is held by another process (on this node or, for a channel
    published elsewhere in the cluster, on the node the message names)."""

    code = "publisher_busy"


class RingCorrupted(ShimmyError):
    """A shared-memory segment failed validation (wrong magic, version or size, or a frame,
    position or word out of bounds); the message names the channel and the offset."""

    code = "ring_corrupted"


class UnsupportedPlatform(ShimmyError, OSError):
    """This machine cannot run the ring code correctly (spec/README.md, "What runs where")."""

    code = "unsupported_platform"


_BY_CODE = {
    cls.code: cls
    for cls in (
        ShimmyError, DaemonUnavailable, InvalidName, InvalidArgument, MessageTooLarge,
        ChannelConflict, ChannelNotFound, LimitExceeded, PermissionDenied, BackpressureTimeout,
        ReceiveTimeout, ChannelClosed, ChannelRetired, MessageOverwritten, ProtocolError,
        StreamBusy, StreamClosed, StreamBroken, RingCorrupted, PublisherBusy, UnsupportedPlatform,
    )
}


def error_from_reply(code: str, message: str) -> ShimmyError:
    """The exception matching a daemon error reply (unknown codes become ``ShimmyError``)."""
    return _BY_CODE.get(code, ShimmyError)(message)
