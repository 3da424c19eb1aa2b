"""Shimmy: shared-memory channels between processes and containers on a node.

Public API: the names in ``__all__`` and the ``shimmy`` command.  Everything else is internal.
"""

from shimmy.errors import (BackpressureTimeout, ChannelClosed, ChannelConflict, ChannelNotFound,
                           ChannelRetired, DaemonUnavailable, InvalidArgument, InvalidName,
                           LimitExceeded, MessageOverwritten, MessageTooLarge, PermissionDenied,
                           ProtocolError, PublisherBusy, ReceiveTimeout, RingCorrupted,
                           ShimmyError, StreamBroken, StreamBusy, StreamClosed,
                           UnsupportedPlatform)
from shimmy.sdk.channel import Channel, Message, Subscription
from shimmy.sdk.stream import Stream, StreamReader, StreamWriter

__version__ = "0.1.0"

__all__ = [
    "Channel", "Subscription", "Message",
    "ShimmyError", "DaemonUnavailable", "InvalidName", "InvalidArgument", "MessageTooLarge",
    "ChannelConflict", "ChannelNotFound", "LimitExceeded", "PermissionDenied",
    "BackpressureTimeout", "ReceiveTimeout", "ChannelClosed", "ChannelRetired", "ProtocolError",
    "StreamBusy", "StreamBroken", "MessageOverwritten", "PublisherBusy", "RingCorrupted",
    "UnsupportedPlatform",
    "Stream", "StreamReader", "StreamWriter", "StreamClosed",
]
