"""Run by test_webui_extension.py under the WebUI's Python: read a LoRA's card the way the WebUI's
extra-networks page does, in-process (its Lora extension's NetworkOnDisk, ExtraNetworksPageLora.create_item,
the user-metadata editor's build_tags, and the cover-image route's function), and print what a user sees
as JSON.

    python read_card.py WEBUI_ROOT DATA_DIR LORA_DIR NAME
"""
from __future__ import annotations

import json
import os
import sys


def main(root: str, data_dir: str, lora_dir: str, name: str) -> dict:
    # --ckpt-dir: an empty folder, so that no checkpoint is loaded in the background (the card needs none)
    sys.argv = [sys.argv[0], "--data-dir", data_dir, "--lora-dir", lora_dir, "--ckpt-dir", data_dir,
                "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half"]
    sys.path[:0] = [root, os.path.join(root, "extensions-builtin", "Lora")]
    os.chdir(root)
    from modules import shared_init

    shared_init.initialize()
    from modules import script_loading

    # As the WebUI loads its built-in extension: the script adds the Lora options the page reads.
    script_loading.load_module(os.path.join(root, "extensions-builtin", "Lora", "scripts", "lora_script.py"))
    import networks
    import ui_edit_user_metadata
    import ui_extra_networks_lora
    from modules import ui_extra_networks

    networks.list_available_networks()
    page = ui_extra_networks_lora.ExtraNetworksPageLora()
    ui_extra_networks.register_page(page)
    page.create_html("txt2img")  # the pane as the page builds it: fills page.items and page.metadata
    item = page.items[name]
    cover = ui_extra_networks.fetch_cover_images(page=page.name, item=name)
    return {"alias": networks.available_networks[name].alias, "sd_version": item["sd_version"],
            "preview": item["preview"], "tags": ui_edit_user_metadata.build_tags(item["metadata"]),
            "metadata": {k: v for k, v in item["metadata"].items() if k != "ssmd_cover_images"},
            "cover": {"media_type": cover.media_type, "bytes": len(cover.body)}}


if __name__ == "__main__":
    print("CARD " + json.dumps(main(*sys.argv[1:5]), default=str))
