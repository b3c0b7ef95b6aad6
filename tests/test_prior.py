"""prior.ensure_class_images: the class-image cache, with a fake backend (no model is loaded)."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_core.class_images import cache as prior
from dreambooth_core.backends.base import SampleSettings
from dreambooth_core.class_images.cache import LOCK, MANIFEST, FileLock, ensure_class_images, load_class_folder

SETTINGS = SampleSettings(steps=5, guidance=4.0, width=32, height=32)
PROMPT = "a photo of a dog"


def image_for(prompt: str, seed: int, settings: SampleSettings) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    return rng.integers(0, 256, (settings.height, settings.width, 3), dtype=np.uint8)


class FakeBackend:
    """Deterministic images from (prompt, seed); records which seeds it was asked for."""

    def __init__(self, fingerprint: str = "fake-model-1", delay: float = 0.0, hook=None):
        self._fingerprint, self.delay, self.hook = fingerprint, delay, hook
        self.calls: list[list[int]] = []

    def fingerprint(self) -> str:
        return self._fingerprint

    def generate(self, prompts, seeds, settings, progress=None):
        self.calls.append(list(seeds))
        if self.hook:
            self.hook(list(seeds))
        if self.delay:
            time.sleep(self.delay)
        return [image_for(p, s, settings) for p, s in zip(prompts, seeds)]

    @property
    def seeds(self) -> list[int]:
        return [s for call in self.calls for s in call]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def assert_valid(folder: Path, count: int) -> None:
    entries = {e["index"]: e for e in manifest(folder)["images"]}
    assert set(range(count)) <= set(entries)
    for i in range(count):
        data = (folder / entries[i]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entries[i]["sha256"]
    assert not list(folder.glob("*.partial")) and not list(folder.glob(".*.partial"))


def test_first_call_generates_and_second_reuses(tmp_path):
    backend = FakeBackend()
    first = ensure_class_images(backend, tmp_path, PROMPT, 6, SETTINGS, seed=10, batch_size=4)
    assert (first.generated, first.reused) == (6, 0) and first.complete
    assert backend.seeds == list(range(10, 16))
    assert [p.name for p in first.paths] == [f"{i:05d}.png" for i in range(6)]
    for i, path in enumerate(first.paths):
        assert np.array_equal(np.asarray(Image.open(path)), image_for(PROMPT, 10 + i, SETTINGS))
    data = manifest(first.folder)
    assert (data["key"]["prompt"], data["key"]["steps"], data["key"]["fingerprint"]) == (PROMPT, 5, "fake-model-1")
    assert [(e["file"], e["seed"]) for e in data["images"]] == [(f"{i:05d}.png", 10 + i) for i in range(6)]
    assert_valid(first.folder, 6)

    again = FakeBackend()
    second = ensure_class_images(again, tmp_path, PROMPT, 6, SETTINGS, seed=10)
    assert (second.generated, second.reused) == (0, 6) and again.calls == []
    assert second.paths == first.paths


def test_top_up_generates_only_the_missing_and_matches_one_shot(tmp_path):
    backend = FakeBackend()
    small = ensure_class_images(backend, tmp_path / "a", PROMPT, 3, SETTINGS)
    before = [p.read_bytes() for p in small.paths]
    stamps = [p.stat().st_mtime_ns for p in small.paths]
    backend.calls.clear()
    big = ensure_class_images(backend, tmp_path / "a", PROMPT, 7, SETTINGS)
    assert (big.generated, big.reused) == (4, 3) and backend.seeds == [3, 4, 5, 6]
    assert [p.read_bytes() for p in big.paths[:3]] == before
    assert [p.stat().st_mtime_ns for p in big.paths[:3]] == stamps
    one_shot = ensure_class_images(FakeBackend(), tmp_path / "b", PROMPT, 7, SETTINGS)
    assert [p.read_bytes() for p in one_shot.paths] == [p.read_bytes() for p in big.paths]
    fewer = ensure_class_images(FakeBackend(), tmp_path / "a", PROMPT, 2, SETTINGS)
    assert fewer.generated == 0 and fewer.paths == big.paths[:2]


@pytest.mark.parametrize("change", [
    dict(prompt="a photo of a cat"),
    dict(settings=SampleSettings(steps=6, guidance=4.0, width=32, height=32)),
    dict(settings=SampleSettings(steps=5, guidance=4.0, width=32, height=32, negative_prompt="blurry")),
    dict(settings=SampleSettings(steps=5, guidance=4.0, width=32, height=32, sampler="euler")),
    dict(seed=1),
    dict(fingerprint="fake-model-2"),
])
def test_a_different_key_uses_another_folder(tmp_path, change):
    base = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 2, SETTINGS)
    backend = FakeBackend(change.get("fingerprint", "fake-model-1"))
    other = ensure_class_images(backend, tmp_path, change.get("prompt", PROMPT), 2,
                                change.get("settings", SETTINGS), seed=change.get("seed", 0))
    assert other.folder != base.folder and other.generated == 2
    assert_valid(base.folder, 2)


def test_corrupted_and_deleted_files_are_regenerated(tmp_path):
    first = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 5, SETTINGS)
    good = first.paths[1].read_bytes()
    first.paths[1].write_bytes(good[:-10] + b"0123456789")  # bit rot / bad copy: hash differs
    first.paths[3].unlink()
    backend = FakeBackend()
    again = ensure_class_images(backend, tmp_path, PROMPT, 5, SETTINGS)
    assert sorted(backend.seeds) == [1, 3] and (again.generated, again.reused) == (2, 3)
    assert first.paths[1].read_bytes() == good
    assert_valid(again.folder, 5)


def test_unreadable_manifest_is_rebuilt(tmp_path):
    first = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 3, SETTINGS)
    (first.folder / MANIFEST).write_text("{ not json")
    backend = FakeBackend()
    again = ensure_class_images(backend, tmp_path, PROMPT, 3, SETTINGS)
    assert again.generated == 3 and again.complete
    assert_valid(again.folder, 3)


def test_should_stop_stops_between_batches_and_keeps_what_was_written(tmp_path):
    backend = FakeBackend()
    done = []
    part = ensure_class_images(backend, tmp_path, PROMPT, 10, SETTINGS, batch_size=2,
                               should_stop=lambda: len(backend.calls) >= 2,
                               progress=lambda d, t: done.append((d, t)))
    assert part.generated == 4 and len(part.paths) == 4 and not part.complete
    assert done == [(0, 10), (2, 10), (4, 10)]
    assert_valid(part.folder, 4)
    rest = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 10, SETTINGS, batch_size=2)
    assert (rest.generated, rest.reused) == (6, 4) and rest.complete


def test_manifest_is_merged_under_the_lock_not_overwritten(tmp_path):
    # While this call generates its last batch, "another process" fills more of the cache
    # (indices 0-5). This call must merge the manifest it re-reads under the lock.
    def other_process(seeds):
        if seeds == [2, 3]:
            ensure_class_images(FakeBackend(), tmp_path, PROMPT, 6, SETTINGS)

    class Different(FakeBackend):  # e.g. a non-deterministic GPU: same seed, other pixels
        def generate(self, prompts, seeds, settings, progress=None):
            return [255 - img for img in super().generate(prompts, seeds, settings)]

    result = ensure_class_images(Different(hook=other_process), tmp_path, PROMPT, 4, SETTINGS, batch_size=2)
    assert result.complete
    assert_valid(result.folder, 6)
    # The file the other process wrote first stays: paths it already returned never change.
    assert np.array_equal(np.asarray(Image.open(result.paths[3])), image_for(PROMPT, 3, SETTINGS))
    assert np.array_equal(np.asarray(Image.open(result.paths[1])), 255 - image_for(PROMPT, 1, SETTINGS))


def test_batches_another_process_finished_meanwhile_are_not_generated(tmp_path):
    def other_process(seeds):
        if seeds == [0, 1]:
            ensure_class_images(FakeBackend(), tmp_path, PROMPT, 4, SETTINGS)

    backend = FakeBackend(hook=other_process)
    result = ensure_class_images(backend, tmp_path, PROMPT, 4, SETTINGS, batch_size=2)
    assert backend.seeds == [0, 1] and (result.generated, result.reused) == (2, 2) and result.complete


def test_windows_style_sharing_violation_is_retried(tmp_path, monkeypatch):
    real_replace, failures = os.replace, []

    def flaky_replace(src, dst):
        if len(failures) < 3:  # another process has the file open for a moment
            failures.append(dst)
            raise PermissionError(13, "The process cannot access the file", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    result = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 2, SETTINGS)
    assert len(failures) == 3 and result.complete
    assert_valid(result.folder, 2)


def test_waits_for_a_lock_held_by_another_process(tmp_path):
    folder = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 1, SETTINGS).folder
    out = {}
    with FileLock(folder / LOCK):
        worker = threading.Thread(target=lambda: out.update(r=ensure_class_images(FakeBackend(), tmp_path, PROMPT,
                                                                                    3, SETTINGS)))
        worker.start()
        time.sleep(0.4)
        assert worker.is_alive()
        assert len(manifest(folder)["images"]) == 1
    worker.join(10)
    assert out["r"].complete and not (folder / LOCK).exists()
    assert_valid(folder, 3)


def test_stale_lock_and_orphaned_partial_files_are_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(prior, "LOCK_TIMEOUT_S", 5.0)  # fail, not hang, if the stale lock were kept
    folder = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 1, SETTINGS).folder
    lock = folder / LOCK
    lock.write_text("12345 0\n")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # left by a crashed process
    orphan = folder / ".00001.png.k2j3.partial"
    orphan.write_bytes(b"half an image")
    start = time.monotonic()
    result = ensure_class_images(FakeBackend(), tmp_path, PROMPT, 2, SETTINGS)
    assert time.monotonic() - start < 10 and result.complete
    assert not lock.exists() and not orphan.exists()


def test_lock_times_out_with_an_actionable_message(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path):
        with pytest.raises(TimeoutError, match="delete that file"):
            with FileLock(path, timeout_s=0.2):
                pass


def _fill(root: str, barrier, queue) -> None:
    try:
        barrier.wait(timeout=120)
        result = ensure_class_images(FakeBackend(delay=0.01), root, PROMPT, 12, SETTINGS, batch_size=2)
        queue.put(("ok", len(result.paths), result.generated))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", repr(e), 0))


def test_two_processes_fill_the_same_cache(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [r[:2] for r in results] == [("ok", 12), ("ok", 12)], results
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert_valid(folder, 12)
    assert len(manifest(folder)["images"]) == 12 and not (folder / LOCK).exists()
    for i in range(12):
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:05d}.png")), image_for(PROMPT, i, SETTINGS))


def test_bad_backend_output_and_arguments(tmp_path):
    class Grey(FakeBackend):
        def generate(self, prompts, seeds, settings, progress=None):
            return [np.zeros((32, 32), np.uint8) for _ in seeds]

    with pytest.raises(RuntimeError, match=r"uint8 H×W×3"):
        ensure_class_images(Grey(), tmp_path, PROMPT, 1, SETTINGS)

    class Short(FakeBackend):
        def generate(self, prompts, seeds, settings, progress=None):
            return []

    with pytest.raises(RuntimeError, match="returned 0 images for 2"):
        ensure_class_images(Short(), tmp_path, PROMPT, 2, SETTINGS)
    with pytest.raises(ValueError, match="count"):
        ensure_class_images(FakeBackend(), tmp_path, PROMPT, -1, SETTINGS)
    with pytest.raises(ValueError, match="class_prompt"):
        ensure_class_images(FakeBackend(), tmp_path, " ", 1, SETTINGS)


def test_float_images_from_a_backend_are_accepted(tmp_path):
    class Floats(FakeBackend):
        def generate(self, prompts, seeds, settings, progress=None):
            return [np.full((32, 32, 3), 0.5, np.float32) for _ in seeds]

    result = ensure_class_images(Floats(), tmp_path, PROMPT, 1, SETTINGS)
    assert Image.open(result.paths[0]).getpixel((0, 0)) == (128, 128, 128)


def test_load_class_folder_validates_and_captions_with_the_class_prompt(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    for i in range(2):
        Image.fromarray(grid[i]).resize((80, 80), Image.Resampling.BICUBIC).save(tmp_path / f"dog{i}.jpg")
    (tmp_path / "dog0.txt").write_text("a sidecar that must be ignored")
    (tmp_path / "broken.png").write_bytes(b"")
    ds = load_class_folder(tmp_path, resolution=64, class_prompt=PROMPT)
    assert [i.source for i in ds.items] == ["dog0.jpg", "dog1.jpg"]
    assert {i.caption for i in ds.items} == {PROMPT}
    assert [r.status for r in ds.report] == ["skipped", "ok", "ok"]  # broken.png, dog0, dog1

    made = ensure_class_images(FakeBackend(), tmp_path / "cache", PROMPT, 3, SETTINGS)
    loaded = made.load(resolution=32)
    assert len(loaded.items) == 3 and loaded.items[0].caption == PROMPT and loaded.items[0].image.size == (32, 32)
