"""Block and chunk keys: deterministic across processes, chained, salted, keyed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from encore.kvmanager.hashing import DEV_SECRET, KEY_BYTES, BlockHasher, pack_tokens, salt_extra

REPO = Path(__file__).resolve().parents[2]

# Pinned so an accidental format change (which would orphan every SSD-cached block) fails.
KNOWN_BLAKE2B = "0d2e4bb06d6994973de30235bb48577881edad9a23fa16e955edce4cc39b7386"
KNOWN_SHA256 = "daa0e3f1a1b11123cd57f5a789d00c81ee6b877664cb26846213259f869510a1"


def test_known_answers_pin_the_format() -> None:
    assert BlockHasher().block_key(None, [1, 2, 3, 4]).hex() == KNOWN_BLAKE2B
    assert BlockHasher(algorithm="sha256").block_key(None, [1, 2, 3, 4]).hex() == KNOWN_SHA256


def test_deterministic_across_processes() -> None:
    code = (
        "from encore.kvmanager.hashing import BlockHasher; h = BlockHasher(b'k'); "
        "k0 = h.block_key(None, [5, 6, 7], b'salt:t'); "
        "print(k0.hex(), h.block_key(k0, [8, 9]).hex(), h.chunk_key('t', [1, 2]).hex())"
    )
    outs = set()
    for seed in ("1", "2"):  # a different str-hash seed in each child
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        res = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        outs.add(res.stdout.strip())
    h = BlockHasher(b"k")
    k0 = h.block_key(None, [5, 6, 7], b"salt:t")
    here = f"{k0.hex()} {h.block_key(k0, [8, 9]).hex()} {h.chunk_key('t', [1, 2]).hex()}"
    assert outs == {here}


def test_keys_are_bytes_of_fixed_length() -> None:
    for algo in ("blake2b", "sha256"):
        key = BlockHasher(algorithm=algo).block_key(None, [1])
        assert isinstance(key, bytes) and len(key) == KEY_BYTES


def test_salt_separates_tenants_along_the_whole_chain() -> None:
    h = BlockHasher()
    tokens = list(range(12))
    a = h.prefix_keys(tokens, 4, salt="tenant-a")
    b = h.prefix_keys(tokens, 4, salt="tenant-b")
    none = h.prefix_keys(tokens, 4, salt=None)
    assert len(a) == 3
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert all(x != y for x, y in zip(a, none, strict=True))
    assert h.prefix_keys(tokens, 4, salt="tenant-a") == a


def test_chain_depends_on_parent_and_fields_are_unambiguous() -> None:
    h = BlockHasher()
    assert h.block_key(b"p1", [1, 2]) != h.block_key(b"p2", [1, 2])
    assert h.block_key(None, [1, 2]) != h.block_key(None, [1, 2, 0])
    assert h.block_key(None, [1], b"x") != h.block_key(b"x", [1])
    assert h.block_key(None, [258]) != h.block_key(None, [2, 1])


def test_secret_and_algorithm_change_every_key() -> None:
    tokens = [1, 2, 3]
    keys = {
        BlockHasher(DEV_SECRET).block_key(None, tokens),
        BlockHasher(b"other").block_key(None, tokens),
        BlockHasher(DEV_SECRET, "sha256").block_key(None, tokens),
        BlockHasher(b"x" * 100).block_key(None, tokens),  # long secrets are pre-hashed
    }
    assert len(keys) == 4


def test_prefix_keys_chain_and_reuse_known() -> None:
    h = BlockHasher()
    tokens = list(range(10))
    keys = h.prefix_keys(tokens, 4, salt="s")
    assert len(keys) == 2  # the partial third block has no key
    k0 = h.block_key(None, tokens[:4], salt_extra("s"))
    assert keys == [k0, h.block_key(k0, tokens[4:8])]
    assert h.prefix_keys(tokens, 4, "s", known=keys[:1]) == keys
    assert h.prefix_keys(tokens, 4, "s", num_blocks=1) == keys[:1]


def test_chunk_keys_are_position_free_and_salted() -> None:
    h = BlockHasher()
    assert h.chunk_key(None, [7, 8, 9]) == h.chunk_key(None, [7, 8, 9])
    assert h.chunk_key("a", [7, 8, 9]) != h.chunk_key("b", [7, 8, 9])
    assert h.chunk_key(None, [7, 8, 9]) != h.block_key(None, [7, 8, 9])


def test_token_packing_is_little_endian_uint32() -> None:
    assert pack_tokens([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    with pytest.raises(OverflowError):
        pack_tokens([-1])


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="hash_algorithm='md5'.*blake2b"):
        BlockHasher(algorithm="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="secret"):
        BlockHasher(b"")
