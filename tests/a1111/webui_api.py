"""The DreamBooth API under bad input and Cancel, the same on every WebUI host (A1111 1.10, Forge).

Test bodies only: tests/a1111/test_webui_robustness.py and tests/forge/test_forge_robustness.py import them, and each
folder's conftest gives the fixtures `host` (its running server, the SD1.5 mini checkpoint loaded) and
`subject_dir` (three photos in the server's folder). What a user relies on: every bad request is a 4xx
that names the input and what to do, and changes nothing; a second job while one runs is a 409; Cancel
during class images keeps the images made (a new job reuses them) and Cancel during training keeps a
checkpoint that resume continues from; the server answers throughout.
"""
from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from webui_server import job_body as _job_body

TRAIN = "/dreambooth/v1/train"
STATUS = "/dreambooth/v1/status"
CANCEL = "/dreambooth/v1/cancel"
JOB_TIMEOUT = 600
#: the class of this module's jobs: its class images are its own (the hosts' other tests count theirs)
CLASS = "vase"


def job_body(subject_dir: Path, name: str, **overrides) -> dict:
    return _job_body(subject_dir, name, **{"class_noun": CLASS, **overrides})


def _alive(host) -> None:
    t0 = time.time()
    assert host.get("/sdapi/v1/options").status_code == 200
    assert time.time() - t0 < 30, "the server was slow to answer"


def _png_bytes(subject_dir: Path) -> bytes:
    return (subject_dir / "subject_0.png").read_bytes()


def _upload(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("overrides, words", [
    ({"token": "xyzzyplugh"}, ["token", "splits into", "tokens"]),
    ({"save_name": "../escape"}, ["save name", "plain file name"]),
    ({"instance_dir": "EMPTY"}, ["no usable image", "no image files"]),
    ({"instance_dir": "MISSING"}, ["instance_dir", "not a folder"]),
    ({"instance_dir": "OUTSIDE"}, ["instance_dir", "outside the webui's folder", "DREAMBOOTH_ALLOW_ANY_PATH"]),
    ({"instance_dir": "ESCAPE"}, ["instance_dir", "outside the webui's folder"]),
    ({"instance_dir": "LINK_OUT"}, ["instance_dir", "outside the webui's folder"]),
    ({"class_dir": "OUTSIDE"}, ["class_dir", "outside the webui's folder"]),
    ({"instance_images": "NOT_BASE64"}, ["instance_images[0]", "not a base64-encoded image"]),
    ({"instance_images": "NOT_AN_IMAGE"}, ["instance_images[1]", "not a base64-encoded image"]),
    ({"instance_images": "TRUNCATED"}, ["instance_images[2]", "truncated", "send the whole file"]),
    ({"mode": "dreamy"}, ["mode", "dreamy"]),
    ({"steps": -3}, ["steps"]),
    ({"concepts": "CONCEPTS"}, ["concepts", "not offered", "one subject per job"]),
])
def test_bad_input_is_refused_with_the_reason(host, subject_dir, tmp_path, overrides, words):
    """Each a 400 naming the input; no job starts. Paths a request names stay inside the WebUI's folder (a
    --listen server is often shared), whether by '..' or by a link placed inside it."""
    empty = host.root / "inputs" / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    (tmp_path / "photo.png").write_bytes(_png_bytes(subject_dir))  # a real folder outside
    link = host.root / "inputs" / "link_out"
    if not link.is_symlink():
        link.symlink_to(tmp_path, target_is_directory=True)
    png = _png_bytes(subject_dir)
    where = {"EMPTY": str(empty), "MISSING": str(host.root / "inputs" / "missing"), "OUTSIDE": str(tmp_path),
             "ESCAPE": str(subject_dir / ".." / ".." / ".." / tmp_path.name), "LINK_OUT": str(link),
             "NOT_BASE64": ["this is not base64!"],
             "NOT_AN_IMAGE": [_upload(png), _upload(b"a text file, not a picture\n" * 20)],
             "TRUNCATED": [_upload(png)] * 2 + [_upload(png[: len(png) // 2])],
             "CONCEPTS": [{"instance_dir": str(tmp_path), "token": "ohwx", "class_noun": "cat"}]}
    overrides = {k: where.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    before = host.get(STATUS)
    r = host.post(TRAIN, job_body(subject_dir, "dbbad", **overrides))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"].lower()
    for word in words:
        assert word.lower() in detail, detail
    after = host.get(STATUS)
    assert after.status_code == before.status_code and after.json().get("id") == before.json().get("id"), \
        "a job was started"
    _alive(host)


def test_uploaded_images_train_without_a_folder(host, subject_dir):
    """Uploads (base64, a data: URL prefix allowed) are the default way to send photos."""
    images = [_upload(p.read_bytes()) for p in sorted(subject_dir.glob("*.png"))]
    images[0] = "data:image/png;base64," + images[0]
    body = job_body(subject_dir, "dbupload", instance_images=images, prior=False, steps=1)
    del body["instance_dir"]
    r = host.post(TRAIN, body)
    assert r.status_code == 200, r.text
    status = host.wait_job(r.json()["id"], timeout=JOB_TIMEOUT)
    assert status["state"] == "completed", status
    assert (host.root / "models" / "Lora" / "dbupload.safetensors").is_file()


def test_a_second_job_while_one_runs_is_refused(host, subject_dir):
    first = host.post(TRAIN, job_body(subject_dir, "dbbusy", steps=500)).json()
    try:
        r = host.post(TRAIN, job_body(subject_dir, "dbbusy2"))
        assert r.status_code == 409, r.text
        assert "already running" in r.json()["detail"] and first["id"] in r.json()["detail"]
        _alive(host)
    finally:
        host.post(CANCEL, {"id": first["id"]})
        assert host.wait_job(first["id"], timeout=JOB_TIMEOUT)["state"] == "cancelled"
    assert not (host.root / "models" / "Lora" / "dbbusy2.safetensors").exists()


def test_cancel_an_unknown_job_is_a_404(host):
    r = host.post(CANCEL, {"id": "nosuchjob"})
    assert r.status_code == 404 and "nosuchjob" in r.json()["detail"], r.text


def test_cancel_during_class_images_keeps_those_made_for_the_next_job(host, subject_dir):
    body = job_body(subject_dir, "dbcancel_class", class_noun="cone", num_class_images=12, steps=1)
    job = host.post(TRAIN, body).json()
    status = host.wait_job(job["id"], until=lambda s: s["state"] == "class_images" and s["class_images_done"] >= 1,
                           timeout=JOB_TIMEOUT)
    assert status["running"], status
    _alive(host)  # the server answers while the job samples
    assert host.post(CANCEL, {"id": job["id"]}).status_code == 200
    status = host.wait_job(job["id"], timeout=JOB_TIMEOUT)
    assert status["state"] == "cancelled" and "class images" in status["message"], status
    made = status["class_images_done"]
    assert 1 <= made < 12 and status["step"] == 0
    assert not (host.root / "models" / "Lora" / "dbcancel_class.safetensors").exists()
    _alive(host)
    # The images made are in the cache: a job asking for that many makes none.
    again = host.post(TRAIN, dict(body, num_class_images=made)).json()
    status = host.wait_job(again["id"], timeout=JOB_TIMEOUT)
    assert status["state"] == "completed", status
    assert status["class_images"]["generated"] == 0 and status["class_images"]["reused"] == made


def test_cancel_during_training_keeps_a_checkpoint_and_resume_finishes(host, subject_dir):
    body = job_body(subject_dir, "dbcancel", steps=500)
    job = host.post(TRAIN, body).json()
    status = host.wait_job(job["id"], until=lambda s: s["step"] >= 2, timeout=JOB_TIMEOUT)
    assert status["running"] and status["state"] == "training" and status["loss"] is not None
    _alive(host)  # the server answers while the job trains
    assert host.post(CANCEL, {"id": job["id"]}).status_code == 200
    status = host.wait_job(job["id"], timeout=JOB_TIMEOUT)
    assert status["state"] == "cancelled", status
    stopped = status["step"]
    assert 2 <= stopped < 500
    checkpoint = host.root / "outputs" / "dreambooth" / "dbcancel" / "checkpoint.safetensors"
    assert status["checkpoint_path"] == str(checkpoint) and checkpoint.is_file()
    assert not (host.root / "models" / "Lora" / "dbcancel.safetensors").exists()
    _alive(host)

    resumed = host.post(TRAIN, dict(body, steps=stopped + 2, resume=True)).json()
    status = host.wait_job(resumed["id"], timeout=JOB_TIMEOUT)
    assert status["state"] == "completed", status
    steps = [h["step"] for h in status["history"]]
    assert steps == list(range(1, stopped + 3)), steps  # continued, not restarted
    assert (host.root / "models" / "Lora" / "dbcancel.safetensors").is_file()
