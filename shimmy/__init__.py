"""Shimmy: shared-memory channels between processes and containers on a node.

Public API: the names in ``__all__`` and the ``shimmy`` command.  Everything else is internal.
"""

from shimmy.errors import (BackpressureTimeout, ChannelClosed, ChannelConflict, ChannelNotFound,
                           DaemonUnavailable, InvalidArgument, InvalidName, LimitExceeded,
                           MessageTooLarge, PermissionDenied, ProtocolError, PublisherBusy,
                           ReceiveTimeout, RingCorrupted, ShimmyError, StreamBroken, StreamBusy,
                           UnsupportedPlatform)
from shimmy.sdk.channel import Channel, Message, MessageOverwritten, Subscription
from shimmy.sdk.stream import Stream, StreamClosed, StreamReader, StreamWriter

__version__ = "0.1.0"

__all__ = [
    "Channel", "Subscription", "Message",
    "ShimmyError", "DaemonUnavailable", "InvalidName", "InvalidArgument", "MessageTooLarge",
    "ChannelConflict", "ChannelNotFound", "LimitExceeded", "PermissionDenied",
    "BackpressureTimeout", "ReceiveTimeout", "ChannelClosed", "ProtocolError", "StreamBusy",
    "StreamBroken", "MessageOverwritten", "PublisherBusy", "RingCorrupted", "UnsupportedPlatform",
    "Stream", "StreamReader", "StreamWriter", "StreamClosed",
]
