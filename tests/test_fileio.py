"""Atomic writes: nothing half-written under the final name, and ordinary file permissions."""
from __future__ import annotations

import os

import pytest

from dreambooth_core import fileio


def test_failed_write_leaves_neither_file_nor_partial(tmp_path):
    target = tmp_path / "out" / "lora.safetensors"
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert not list(target.parent.iterdir())


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    """mkstemp makes 0600 files; a LoRA in a shared models/ folder must be readable like the rest."""
    old = os.umask(0o022)
    try:
        fileio.write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        fileio.write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600
