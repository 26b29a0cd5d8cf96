"""The one place that turns --device into a torch device, for training, --test and predict."""
import os

import torch

from engine.run_folder import RunError


def pick_device(name: str | None = None, local_rank: int = 0) -> torch.device:
    """The device of --device.

    Args:
        name: "cpu"; an index "N" or None (GPU N, or 0, when one is visible, else the CPU: the paper's
            scripts pass --device 0 and still run on a CPU machine); "cuda" / "cuda:N" (a GPU is required).
        local_rank: torchrun's LOCAL_RANK; under data parallelism each process takes that GPU.
    """
    text = "0" if name is None else str(name).strip()
    if text == "cpu":
        return torch.device("cpu")
    explicit_cuda = text.startswith("cuda")
    index_text = text.split(":", 1)[1] if explicit_cuda and ":" in text else ("0" if explicit_cuda else text)
    index_text = index_text.split(",")[0]  # "0,1" (the paper's multi-GPU form): the first
    if not index_text.isdigit():
        raise RunError(f"--device {name}: expected cpu, a GPU index N, cuda or cuda:N")
    if not torch.cuda.is_available():
        if explicit_cuda:
            raise RunError(f"--device {name} asks for a GPU but none is visible; use --device cpu")
        return torch.device("cpu")
    index = local_rank if int(os.environ.get("WORLD_SIZE", "1")) > 1 else int(index_text)
    if index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible (indices from 0)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
