"""Release bundles: `python run.py export` (release.export, torch) writes a folder with an ONNX model that holds
the pre- and post-processing, the weights, a model card and checksums; `python run.py predict --model`
(release.onnx_predict, onnxruntime) runs it without torch. release.bundle and release.onnx_predict never
import torch, directly or through another module."""
