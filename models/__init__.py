"""Networks (MONAI-compatible BasicUNet, the paper's per-level SegNet, the multi-level model),
feature propagation, and checkpoint I/O."""
from models.basic_unet import BasicUNet
from models.checkpoint import (CheckpointError, checkpoint_state_dict, load_checkpoint, load_model_state,
                               save_checkpoint)
from models.feature_propagation import feature_propagation
from models.segmentation_net import MultiLevelNet, SegNet, build_model, ensemble_segnet

__all__ = ["BasicUNet", "SegNet", "MultiLevelNet", "build_model", "ensemble_segnet", "feature_propagation",
           "save_checkpoint", "load_checkpoint", "load_model_state", "checkpoint_state_dict", "CheckpointError"]
