"""The cluster secret's push proof: how a sender shows a receiver it knows the secret.

When the receiver has a secret (``secret=``, every backend), it accepts a
transfer only from a sender that proves it knows the same secret. The proof
is ``HMAC-SHA256(secret, [transfer_id, sender worker id, nbytes])``
(:func:`transfer_proof`), computed by the sender and carried with the
transfer's first message (gRPC metadata, the store's "go" record, the Ray
deliver call); the receiver checks it with ``hmac.compare_digest`` before it
writes a byte or fetches anything (``TransportBase._authenticate`` in
:mod:`kvtransfer.transport_base`). A push without the right proof fails that
transfer on the receiver (if it expects one of that id) with
:data:`SECRET_REFUSED` and is refused to the sender; the transport itself
goes on serving other transfers. A receiver without a secret accepts any
sender (the behaviour without secrets), and the secret is never logged, sent
or shown in an endpoint.

What it does not do: encrypt or sign the KV bytes themselves (an attacker on
the network path can read or change them; use a private network), or protect
the backends' control channels (see :mod:`kvtransfer.torch_dist` on the
``TCPStore``). A proof is good for one (transfer id, sender, size) only, and a
receiver accepts one delivery per expected id, so a replayed proof buys nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json

SECRET_REFUSED = "peer did not present the cluster secret"
_PROOF_CONTEXT = b"splitserve-kvtransfer-proof-v1\0"  # domain separation: this key signs nothing else


def transfer_proof(secret: bytes, transfer_id: str, sender_id: str, nbytes: int) -> str:
    """Hex HMAC-SHA256 by which a sender proves it knows ``secret`` for one transfer."""
    msg = json.dumps([transfer_id, sender_id, int(nbytes)], separators=(",", ":")).encode()
    return hmac.new(secret, _PROOF_CONTEXT + msg, hashlib.sha256).hexdigest()


def proof_matches(secret: bytes, transfer_id: str, sender_id: str, nbytes: int, proof: object) -> bool:
    """Whether ``proof`` (anything a peer sent) is the right proof, compared in constant time."""
    expected = transfer_proof(secret, transfer_id, sender_id, nbytes)
    return isinstance(proof, str) and proof.isascii() and hmac.compare_digest(expected, proof)
