"""Wire protocol: the message registry, the strict codec and every message type."""

from common.protocol.codec import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Frame,
    ProtocolError,
    build_dispatch,
    decode,
    encode,
    ops_served_by,
    registered_ops,
    spec_for,
)
from common.protocol.messages import *  # noqa: F401,F403  (registers every message)
from common.protocol.messages import __all__ as _messages_all  # noqa: F401
from common.protocol.admin_messages import *  # noqa: F401,F403
from common.protocol.admin_messages import __all__ as _admin_all  # noqa: F401

__all__ = [
    "MAX_FRAME_BYTES", "PROTOCOL_VERSION", "Frame", "ProtocolError", "build_dispatch", "decode",
    "encode", "ops_served_by", "registered_ops", "spec_for", *_messages_all, *_admin_all,
]
