"""Any timm model, built locally (pretrained=False: nothing is downloaded): `model.arch=timm:NAME`
for supervised training (e.g. a convnet teacher), and DeiT's teachers (`task.teacher.arch`)."""
from __future__ import annotations

from typing import Any


def timm_model_name(arch: str, key: str) -> str:
    """The timm name in `arch` ("timm:" optional), checked against timm's registry; `key` is the
    recipe key that gave it, for the error."""
    import timm

    from ..config import ConfigError

    name = arch.removeprefix("timm:")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"{key}={arch}: timm has no model {name!r} (similar: {', '.join(close) or 'none'})")
    return name


def create_timm_model(arch: str, options: dict[str, Any], key: str = "model.arch"):
    """timm's model `arch` with num_classes, in_chans (and drop_path_rate, img_size) from `options`. It
    carries `ssl_vit_config`, what our exports record so that init= / task.teacher.weights= rebuild it."""
    import timm

    name = timm_model_name(arch, key)
    model = timm.create_model(name, pretrained=False, num_classes=options["num_classes"],
                              in_chans=options["in_chans"], drop_path_rate=options.get("drop_path_rate") or None)
    model.ssl_vit_config = {"arch": f"timm:{name}", "num_classes": options["num_classes"],
                            "in_chans": options["in_chans"]}
    if options.get("img_size") is not None:  # the training input (a teacher's is decided by its Teacher)
        size = options["img_size"]
        model.ssl_vit_config["img_size"] = [size, size] if isinstance(size, int) else list(size)
    return model
