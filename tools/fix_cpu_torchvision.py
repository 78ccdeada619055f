"""Make PyPI's CUDA torchvision importable next to a CPU-only torch.

PyPI ships torchvision for torch 2.13 as a CUDA build. With the CPU torch wheel its C
extension cannot load, and ``import torchvision`` then fails inside
``torchvision._meta_registrations`` with "operator torchvision::nms does not exist".
timm and transformers import torchvision, so they fail too.

BLIP only needs torchvision's transforms (pure Python). When the extension does not load,
this script writes a ``.pth`` file into site-packages that pre-registers an empty
``torchvision._meta_registrations`` module, so the import succeeds; ``nms`` and the image
codecs stay unavailable. Where the extension loads (GPU machines) it does nothing.

Run it with the interpreter of the environment to fix: ``python tools/fix_cpu_torchvision.py``.
"""
import importlib.util
import os
import site
import sys

PTH_NAME = "blip_cpu_torchvision_fix.pth"
PTH_LINE = (
    "import sys, types; "
    "sys.modules.setdefault('torchvision._meta_registrations', "
    "types.ModuleType('torchvision._meta_registrations'))\n"
)


def extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
        return True
    except (OSError, RuntimeError):
        return False


def main() -> int:
    target = os.path.join(site.getsitepackages()[0], PTH_NAME)
    if extension_loads():
        if os.path.exists(target):
            os.remove(target)
        print("torchvision's C extension loads; no fix needed")
        return 0
    with open(target, "w") as f:
        f.write(PTH_LINE)
    print(f"torchvision's C extension does not load on this torch; wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
