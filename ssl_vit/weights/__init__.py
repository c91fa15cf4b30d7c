"""Weights in and out, above the tasks whose formats and exports they use: `load_weights` (any file into
an encoder or a task, loading.py), exports for timm (exports.py) and Hugging Face transformers (hf.py).
Reading files safely and loading bare models is a layer lower, in models/files.py."""
from ..config import CheckpointError
from ..models import LoadReport
from ..models.files import encoder_config_of, export_description, read_checkpoint, unwrap
from .exports import export_backbone, export_model
from .loading import claiming_task, load_weights

__all__ = ["CheckpointError", "LoadReport", "claiming_task", "encoder_config_of", "export_backbone", "export_description",
           "export_model", "load_weights", "read_checkpoint", "unwrap"]
