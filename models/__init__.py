"""Networks (MONAI-compatible BasicUNet, the paper's per-level SegNet, the multi-level model),
feature propagation, and checkpoint I/O. The Triton propagation (models.feature_propagation_triton)
is not imported here: it is loaded only when selected."""
from models.basic_unet import BasicUNet
from models.checkpoint import (
    CheckpointError,
    checkpoint_state_dict,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from models.feature_propagation import PROPAGATIONS, feature_propagation, propagation_function
from models.segmentation_net import MultiLevelNet, SegNet, build_model, ensemble_segnet

__all__ = [
    "PROPAGATIONS",
    "BasicUNet",
    "CheckpointError",
    "MultiLevelNet",
    "SegNet",
    "build_model",
    "checkpoint_state_dict",
    "ensemble_segnet",
    "feature_propagation",
    "load_checkpoint",
    "load_model_state",
    "propagation_function",
    "save_checkpoint",
]
