"""ComfyUI entry point of the DreamBooth node pack.

Drop this repository into ComfyUI/custom_nodes/ and restart: the nodes appear under the
"DreamBooth" category. The repository root is also the source tree of the standalone
`dreambooth_core` package; here it is imported relatively, as a subpackage of this pack, so the
pack never depends on (or shadows) anything on sys.path.
"""
# ComfyUI always imports this folder as a package. Read as a lone module (pytest does that when the
# clone's folder name is not a Python identifier, e.g. `tmp.x1`), there is no pack to register.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
