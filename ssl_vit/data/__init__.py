"""Data: webdataset shards (writing, resolving, streaming), transforms, and the embedded digits set.

    build_train_loader(cfg, ...)  -> TrainData: .epoch(e, skip_batches) yields exactly
                                     batches_per_epoch batches on every rank
    build_eval_loader(cfg, ...)   -> EvalData: every sample of the split once over all ranks
    batches are {"images": uint8 [B, 3, H, W], "labels": int64 [B], "keys": [str]};
    DeviceNormalize turns the images into normalised floats on the device.
    Transform: the protocol of a training transform (decode once, then augment into one view or a
    dict of views of one crop), written in transforms.py.
"""
import importlib

_PUBLIC = {
    "build_train_loader": "loaders", "build_eval_loader": "loaders", "shard_source": "loaders",
    "samples_per_epoch": "loaders", "num_classes": "loaders", "TrainData": "loaders", "EvalData": "loaders",
    "FeatureData": "features",
    "DeviceNormalize": "transforms", "Transform": "transforms", "as_transform": "transforms",
}
__all__ = list(_PUBLIC)


def __getattr__(name):  # imported on first use: tools/make_shards.py needs only the writer (and PIL)
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
