"""The disk tier's files (real files in a temp dir) and the deployment secret."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from encore.configs.secrets import block_key_secret, deployment_secret, tenant_salt
from encore.configs.types import CacheConfig
from encore.worker.tiers.disk_files import HEADER, CorruptFile, DiskStore

FP = b"f" * 32
PAYLOAD = 256
MAC_KEY = b"m" * 32


def key(i: int) -> bytes:
    return bytes([i]) * 32


def store(tmp_path: Path, fp: bytes = FP) -> DiskStore:
    return DiskStore(tmp_path, fp, PAYLOAD, MAC_KEY)


def test_write_read_round_trip_and_restart_scan(tmp_path: Path) -> None:
    s = store(tmp_path)
    for i in range(3):
        s.write(key(i), bytes([i]) * PAYLOAD)
        os.utime(s.path(key(i)), (time.time() - 100 + i, time.time() - 100 + i))
    assert s.read(key(1)) == bytes([1]) * PAYLOAD
    keys, bad = store(tmp_path).scan(capacity=10)
    assert bad == 0 and set(keys) == {key(0), key(1), key(2)}
    assert keys[-1] == key(1), "a read refreshes recency (newest last)"
    assert not list(tmp_path.rglob("*.tmp"))


def test_scan_trims_to_capacity_oldest_first(tmp_path: Path) -> None:
    s = store(tmp_path)
    for i in range(4):
        s.write(key(i), bytes(PAYLOAD))
        os.utime(s.path(key(i)), (1000 + i, 1000 + i))
    keys, _ = s.scan(capacity=2)
    assert keys == [key(2), key(3)]
    assert not s.path(key(0)).exists() and not s.path(key(1)).exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_model", "header_only"])
def test_bad_files_are_detected_deleted_and_counted(tmp_path: Path, damage: str) -> None:
    s = store(tmp_path)
    s.write(key(7), bytes(range(256)))
    path = s.path(key(7))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[HEADER.size + 10] ^= 0xFF
    elif damage == "truncate":
        data = data[: HEADER.size + 100]
    elif damage == "other_model":
        other = store(tmp_path / "o2", b"o" * 32)
        other.write(key(7), bytes(range(256)))
        data = bytearray(other.path(key(7)).read_bytes())
    else:
        data = data[: HEADER.size // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile):
        s.read(key(7))
    assert not path.exists(), "a bad file is deleted on read"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(data))
    keys, bad = store(tmp_path).scan(capacity=10)
    if damage == "flip":  # the header is fine: caught by the checksum on the first read
        assert keys == [key(7)] and bad == 0
    else:
        assert keys == [] and bad == 1 and not path.exists()


def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.write(key(1), bytes(PAYLOAD))
    tmp = s.path(key(1)).with_name(".x.tmp")
    tmp.write_bytes(b"partial")
    s.scan(capacity=4)
    assert not tmp.exists() and s.path(key(1)).exists()


def test_a_forged_file_with_a_valid_header_is_a_miss(tmp_path: Path) -> None:
    """Anyone can compute a header (and a CRC) over bytes of their choice; only the holder of
    the deployment secret can compute the MAC."""
    s = store(tmp_path)
    s.write(key(3), bytes(PAYLOAD))
    path = s.path(key(3))
    forged = bytes([0xAB]) * PAYLOAD
    header = bytearray(path.read_bytes()[: HEADER.size])
    path.write_bytes(bytes(header) + forged)  # same header, other payload
    with pytest.raises(CorruptFile, match="authentication"):
        s.read(key(3))
    other = DiskStore(tmp_path, FP, PAYLOAD, b"another deployment's key!")
    other.write(key(4), forged)  # a valid file of another secret
    assert store(tmp_path).scan(capacity=10)[0] == [key(4)], "its header passes the scan"
    with pytest.raises(CorruptFile):
        store(tmp_path).read(key(4))


def test_scan_skips_what_is_not_a_block_file(tmp_path: Path) -> None:
    """A stray directory, a link or a foreign file inside the cache directory never turns the
    tier off; directories and links are left alone, foreign files count as bad."""
    s = store(tmp_path)
    s.write(key(1), bytes(PAYLOAD))
    sub = s.path(key(1)).parent
    (sub / "stray-dir").mkdir()
    (sub / (key(2).hex() + ".kv")).mkdir()  # a directory with a block file's name
    (sub / "link.kv").symlink_to(tmp_path / "nowhere")
    (sub / "notes.txt").write_text("not ours")
    keys, bad = store(tmp_path).scan(capacity=10)
    assert keys == [key(1)] and bad == 1
    assert (sub / "stray-dir").is_dir() and (sub / "link.kv").is_symlink()


def test_a_read_only_directory_is_detected(tmp_path: Path, monkeypatch) -> None:
    """A read-only mount: the store says so (the engine then stores nothing) and scans."""
    s = store(tmp_path)
    s.write(key(1), bytes(PAYLOAD))

    def refuse(self, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    ro = store(tmp_path)
    assert not ro.writable and ro.scan(capacity=10)[0] == [key(1)]
    assert ro.read(key(1)) == bytes(PAYLOAD)


def test_unwritable_directory_raises_oserror(tmp_path: Path) -> None:
    s = store(tmp_path)
    (s.dir / key(9).hex()[:2]).write_text("a file where a directory should be")
    with pytest.raises(OSError):
        s.write(key(9), bytes(PAYLOAD))


def test_secret_is_created_once_and_survives(tmp_path: Path) -> None:
    d = CacheConfig(disk_cache_dir=str(tmp_path / "kv"))
    first = deployment_secret(d)
    assert len(first) == 32 and deployment_secret(d) == first
    assert (tmp_path / "kv" / "secret").stat().st_mode & 0o777 == 0o600
    assert block_key_secret(d) == block_key_secret(d) != block_key_secret(CacheConfig())
    assert tenant_salt(first, "key-a") != tenant_salt(first, "key-b")
    assert tenant_salt(first, "key-a") == tenant_salt(deployment_secret(d), "key-a")
    assert "key-a" not in tenant_salt(first, "key-a")


def test_a_fleet_shares_one_secret_from_a_file_or_the_environment(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Replicas with their own disk directories but one secret file (or env var) derive the
    same block keys; a file or variable that is set but unusable is an error, not a
    silent per-process secret."""
    (tmp_path / "fleet.secret").write_text("correct horse battery staple\n")
    a = CacheConfig(disk_cache_dir=str(tmp_path / "a"),
                    deployment_secret_file=str(tmp_path / "fleet.secret"))
    b = CacheConfig(disk_cache_dir=str(tmp_path / "b"),
                    deployment_secret_file=str(tmp_path / "fleet.secret"))
    from_file = block_key_secret(a)
    assert from_file == block_key_secret(b)
    assert from_file != block_key_secret(CacheConfig(disk_cache_dir=str(tmp_path)))
    monkeypatch.setenv("ENCORE_DEPLOYMENT_SECRET", "another fleet's secret")
    assert block_key_secret(a) != from_file, "the environment wins over the file"
    assert block_key_secret(a) == block_key_secret(CacheConfig())
    monkeypatch.setenv("ENCORE_DEPLOYMENT_SECRET", "short")
    with pytest.raises(ValueError, match="at least 16"):
        deployment_secret(a)
    monkeypatch.delenv("ENCORE_DEPLOYMENT_SECRET")
    with pytest.raises(ValueError, match="deployment_secret_file"):
        deployment_secret(CacheConfig(deployment_secret_file=str(tmp_path / "missing")))
