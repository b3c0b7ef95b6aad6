"""Atomic, pickle-free file writing: nothing half-written ever sits under a final name."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have, so a
        # LoRA saved into a shared models/ folder is readable like every other file there.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask would briefly
    set it process-wide, racing a host's other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, "torch.Tensor"],
                 metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def read_metadata(path: str | os.PathLike) -> dict:
    """The `__metadata__` of a safetensors file, read from its header alone (no tensor is loaded, no
    library needed: listing many files stays cheap). ValueError names a file that is not safetensors."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (its header size is {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def add_metadata(path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Merge `metadata` into a safetensors file's header (a library that saves without metadata, e.g.
    diffusers' save_pretrained, gets it afterwards). The tensor bytes are copied as they are: the
    header holds their offsets relative to the data, so only the header changes."""
    import shutil
    import struct

    final = Path(path)
    with open(final, "rb") as src:
        (size,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(size))
        header["__metadata__"] = {**header.get("__metadata__", {}), **{k: str(v) for k, v in metadata.items()}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned
        with atomic_path(final) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, out, 1 << 20)


def save_image(path: str | os.PathLike, image: "Any") -> None:
    """Save a PIL image atomically, format taken from the final name's suffix."""
    final = Path(path)
    with atomic_path(final) as tmp:
        image.save(tmp, format=(final.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))


def safe_name(name: str) -> str:
    """A file stem that cannot leave the output folder."""
    stem = Path(name.replace("\\", "/")).name
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if stem in ("", ".", "..") or stem != name.replace(".safetensors", "") or stem.startswith("."):
        raise ValueError(f"save name {name!r}: use a plain file name without folders (e.g. 'my_dog')")
    return stem


#: the environment variable by which a server's owner lets requests name any folder on the machine
ALLOW_ANY_PATH_ENV = "DREAMBOOTH_ALLOW_ANY_PATH"


def any_path_allowed() -> bool:
    """Whether the server's owner allowed paths outside the host's own folders (shared servers must
    not expose the machine's files through a node input or an API request)."""
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether `path` lies in `root` (both as given: resolve them first as the caller needs)."""
    root = os.path.abspath(root)
    try:
        return os.path.commonpath([os.path.abspath(path), root]) == root
    except ValueError:  # another drive on Windows
        return False
