"""Split learning: hospitals run encoders and keep labels; a server runs the head.

``split-plain`` sends plaintext activations (the baseline); ``split-he`` sends
CKKS ciphertexts and the server computes on them with a public context only.
Both use the same hospital and server code; only the transport differs.
"""
from splitfl.split.server import SplitServer
from splitfl.split.transport import HETransport, PlainTransport, ProtocolError

__all__ = ["SplitServer", "PlainTransport", "HETransport", "ProtocolError"]
