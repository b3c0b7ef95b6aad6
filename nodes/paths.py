"""Where the nodes may read and write: ComfyUI's own folders, and nothing else by default.

ComfyUI servers are often shared on a network, so a node must not become a way to read the
server's files. A dataset folder typed by hand is accepted only inside the host's input or output
folder unless the server's owner opts in with the environment variable `DREAMBOOTH_ALLOW_ANY_PATH=1`.
Everything the nodes write goes under the host's output folder (checkpoints, class images, full
fine-tunes) or the first `loras` model folder (trained LoRAs, so the stock LoraLoader lists them).
"""
from __future__ import annotations

import os

from ..dreambooth_core.fileio import ALLOW_ANY_PATH_ENV, any_path_allowed, inside
NO_FOLDER = "[none]"
CLASS_IMAGE_DIR = "dreambooth_class_images"
RUNS_DIR = "dreambooth"


class PathNotAllowed(PermissionError):
    pass


def input_subfolders() -> list:
    """The choices of the folder combo: subfolders of the input directory, as the host's own
    LoadImageSetFromFolderNode lists them, and a last entry for "use the IMAGE input / path"."""
    import folder_paths

    return list(folder_paths.get_input_subfolders()) + [NO_FOLDER]


def resolve_dataset_folder(folder: str, path: str = "") -> str:
    """The absolute folder to read instance images from.

    `path` (typed by hand) wins over `folder` (a subfolder of the input directory). A relative
    path is taken relative to the input directory. The result must lie inside the input or output
    directory (after resolving '..'), unless DREAMBOOTH_ALLOW_ANY_PATH=1."""
    import folder_paths

    input_dir = os.path.abspath(folder_paths.get_input_directory())
    output_dir = os.path.abspath(folder_paths.get_output_directory())
    raw = (path or "").strip()
    if raw:
        candidate = os.path.abspath(os.path.join(input_dir, os.path.expanduser(raw)))
        shown = raw
    else:
        if not folder or folder == NO_FOLDER:
            raise ValueError("DreamBooth Dataset: no images. Choose a folder (a subfolder of ComfyUI's input "
                             "folder), type a path, or connect an IMAGE batch to 'images'.")
        candidate = os.path.abspath(os.path.join(input_dir, folder))
        shown = folder
    if not any_path_allowed() and not (inside(candidate, input_dir) or inside(candidate, output_dir)):
        raise PathNotAllowed(
            f"DreamBooth Dataset: the path {shown!r} is outside ComfyUI's input and output folders, so it is "
            f"refused (a shared server must not expose its files). Put the images in a subfolder of "
            f"{input_dir}, or, if you own this server, start it with {ALLOW_ANY_PATH_ENV}=1 to allow any path.")
    if not os.path.isdir(candidate):
        raise ValueError(f"DreamBooth Dataset: {shown!r} is not a folder (looked in {candidate}).")
    return candidate


def run_dir(save_name_stem: str) -> str:
    """output/dreambooth/<save name>/: checkpoints, loss curve, config of one training run."""
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), RUNS_DIR, save_name_stem)


def class_image_root() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), CLASS_IMAGE_DIR)


def lora_dir() -> str:
    """The first `loras` model folder (models/loras by default): where LoraLoader looks."""
    import folder_paths

    dirs = folder_paths.get_folder_paths("loras")
    if not dirs:
        raise RuntimeError("ComfyUI has no 'loras' model folder configured")
    return dirs[0]
