"""Ed25519 identities: libp2p-compatible peer ids, signatures, key files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyType
from libp2p.crypto.pb import crypto_pb2
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair
from libp2p.peer.id import ID

from p2pfl.identity import (
    Identity,
    peer_id_from_bytes,
    peer_id_to_bytes,
    public_key_of,
    verify,
)

SEED = bytes(range(32))


def test_peer_id_is_libp2ps_own() -> None:
    identity = Identity.generate(SEED)
    reference = create_new_key_pair(SEED)
    assert identity.peer_id == ID.from_pubkey(reference.public_key).to_base58()
    assert identity.peer_id.startswith("12D3KooW")
    assert identity.peer_id_bytes == ID.from_base58(identity.peer_id).to_bytes()
    assert ID.from_pubkey(identity.libp2p_keypair.public_key).to_base58() == identity.peer_id


def test_key_file_format_is_libp2ps() -> None:
    identity = Identity.generate(SEED)
    assert identity.private_bytes() == create_new_key_pair(SEED).private_key.serialize()
    assert identity.sign(b"x") == create_new_key_pair(SEED).private_key.sign(b"x")


def test_libsodium_and_openssl_agree_on_signatures() -> None:
    """Signing and checking run on libsodium (issue 17: twice as fast to check); a
    signature is the same bytes OpenSSL makes, and each library accepts the other's."""
    openssl = Ed25519PrivateKey.from_private_bytes(SEED)
    identity = Identity.generate(SEED)
    for data in (b"", b"x", bytes(range(256)) * 40):
        assert identity.sign(data) == openssl.sign(data)
        openssl.public_key().verify(identity.sign(data), data)  # raises if not
        assert verify(identity.peer_id, data, openssl.sign(data))
        tampered = bytearray(identity.sign(data))
        tampered[10] ^= 1
        assert not verify(identity.peer_id, data, bytes(tampered))


def test_a_small_order_key_verifies_nothing() -> None:
    """libsodium refuses keys of small order, whose 'signatures' anyone can make: the
    identity point (encoded as 1 followed by zeros) with the signature R = identity,
    S = 0 satisfies the equation for every message."""
    identity_point = bytes([1]) + bytes(31)
    peer_id = peer_id_from_bytes(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + identity_point)
    assert not verify(peer_id, b"any model", identity_point + bytes(32))


def test_importing_the_wire_does_not_import_libp2p() -> None:
    """Protocols and the simulator use the wire; DESIGN.md keeps libp2p away from them."""
    code = "import sys, p2pfl.wire, p2pfl.security; sys.exit('libp2p' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_generate_is_reproducible_with_a_seed_and_random_without() -> None:
    assert Identity.generate(SEED).peer_id == Identity.generate(SEED).peer_id
    assert Identity.generate().peer_id != Identity.generate().peer_id
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.generate(b"short")


def test_signature_verifies_from_the_peer_id_alone() -> None:
    alice, bob = Identity.generate(SEED), Identity.generate()
    signature = alice.sign(b"model digest")
    assert len(signature) == 64
    assert verify(alice.peer_id, b"model digest", signature)
    assert not verify(alice.peer_id, b"model digest!", signature)
    assert not verify(bob.peer_id, b"model digest", signature)
    assert not verify(alice.peer_id, b"model digest", signature[:-1])
    assert not verify(alice.peer_id, b"model digest", bytes(64))


@pytest.mark.parametrize(
    "peer_id",
    ["", "not base58 0OIl", "1" * 200, "12D3KooW", "1" + Identity.generate(SEED).peer_id],
)
def test_malformed_peer_ids_verify_nothing(peer_id: str) -> None:
    assert not verify(peer_id, b"x", Identity.generate(SEED).sign(b"x"))
    with pytest.raises(ValueError):
        public_key_of(peer_id)


def test_hashed_peer_ids_carry_no_key() -> None:
    rsa = create_rsa_key_pair(bits=1024)
    rsa_id = ID.from_pubkey(rsa.public_key).to_base58()  # SHA-256 multihash: "Qm..."
    assert rsa_id.startswith("Qm")
    assert not verify(rsa_id, b"x", rsa.private_key.sign(b"x"))


def test_peer_id_bytes_round_trip() -> None:
    identity = Identity.generate(SEED)
    assert peer_id_to_bytes(identity.peer_id) == identity.peer_id_bytes
    assert peer_id_from_bytes(identity.peer_id_bytes) == identity.peer_id


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id
    assert sorted(os.listdir(path.parent)) == ["node.key"]  # no temp file left behind
    # the file holds libp2p's protobuf private key
    proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    assert proto.key_type == KeyType.Ed25519.value


def test_key_file_loses_no_race(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    winner = Identity.generate(SEED)
    path.write_bytes(winner.private_bytes())
    os.chmod(path, 0o600)
    assert Identity.load_or_create(path).peer_id == winner.peer_id


def test_go_libp2p_64_byte_keys_load() -> None:
    identity = Identity.generate(SEED)
    go_style = crypto_pb2.PrivateKey(
        key_type=KeyType.Ed25519.value, data=SEED + identity.public_key_bytes
    ).SerializeToString()
    assert Identity.from_private_bytes(go_style).peer_id == identity.peer_id
    mismatched = crypto_pb2.PrivateKey(
        key_type=KeyType.Ed25519.value, data=SEED + bytes(32)
    ).SerializeToString()
    with pytest.raises(ValueError, match="does not match"):
        Identity.from_private_bytes(mismatched)


@pytest.mark.parametrize("content", [b"", b"garbage\xff\xff", b"\x08\x00\x12\x03abc"])
def test_corrupt_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError):
        Identity.load_or_create(path)


def test_world_readable_key_file_warns(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(Identity.generate(SEED).private_bytes())
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        Identity.load_or_create(path)
