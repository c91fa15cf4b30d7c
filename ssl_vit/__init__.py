"""ssl_vit: shared encoders (a timm-compatible ViT, any timm model) and interchangeable tasks (MAE,
classification, linear probing, DeiT distillation) behind one written contract each, one Accelerate
training loop, webdataset shards.

The public names are imported on first use, so that command-line tools can check their
arguments (and print --help) before paying for `import torch`.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ARCHS": "ssl_vit.models.vit",
    "VisionTransformer": "ssl_vit.models.vit",
    "create_encoder": "ssl_vit.models",
    "build_encoder": "ssl_vit.models",
    "register_family": "ssl_vit.models",
    "register_task": "ssl_vit.tasks",
    "Task": "ssl_vit.tasks",
    "load_weights": "ssl_vit.weights",
    "export_backbone": "ssl_vit.weights",
    "export_model": "ssl_vit.weights",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ssl_vit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
