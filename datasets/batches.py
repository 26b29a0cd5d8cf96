"""Training batches with stateless randomness, preloaded or streamed.

The shuffle of epoch e depends only on (seed, e) and the flips of iteration t only on (seed, t), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would, and data-parallel ranks
agree on the global batch without communicating. Each rank takes its slice of the global batch.
"""
import math
from typing import Iterator, Tuple

import torch

from datasets.segmentation import SegmentationDataset, random_flip


def _generator(seed: int, salt: int, value: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + value) % (2 ** 63))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(seed, 1, epoch))


def iteration_flips(batch: int, seed: int, iteration: int) -> torch.Tensor:
    """(batch, 2) bool: flip the H axis / the W axis, each with probability 0.5."""
    return torch.rand(batch, 2, generator=_generator(seed, 2, iteration)) < 0.5


def _stack(dataset: SegmentationDataset, num_workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=num_workers, shuffle=False)
    images, targets = [], []
    for batch in loader:
        images.append(batch["image"])
        targets.append(batch["target"].to(torch.uint8))
    return torch.cat(images), torch.cat(targets)


class TrainBatches:
    """Yields (iteration, images, targets) on `device`, flips applied.

    Args:
        dataset: a train-mode SegmentationDataset.
        batch_size: per-process batch size; the global batch is batch_size * world_size.
        seed: the run's seed.
        device: where batches (and, when preloaded, the whole resized training set) live.
        preload: decode and resize every sample once and keep the tensors (only the flips are random,
            so this equals re-reading each epoch); otherwise a DataLoader decodes every step.
        num_workers: DataLoader workers for decoding.
        rank, world_size: this process's slice of each global batch.
    """

    def __init__(self, dataset: SegmentationDataset, batch_size: int, seed: int, device, preload: bool = True,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device, self.num_workers = torch.device(device), num_workers
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.tensors = None
        if preload:
            images, targets = _stack(dataset, num_workers)
            self.tensors = (images.to(self.device), targets.to(self.device))

    def __len__(self) -> int:
        """Steps per epoch (the last global batch may be partial; with several ranks it is dropped if too small)."""
        n = len(self.dataset)
        steps = math.ceil(n / self.global_batch)
        if self.world_size > 1 and n % self.global_batch and n % self.global_batch < self.world_size:
            steps -= 1
        return steps

    def _rank_slice(self, global_idx: torch.Tensor, flips: torch.Tensor):
        part = torch.arange(len(global_idx)).tensor_split(self.world_size)[self.rank]
        return global_idx[part], flips[part]

    def _load(self, idx: torch.Tensor):
        if self.tensors is not None:
            images, targets = self.tensors
            dev_idx = idx.to(self.device)
            return images[dev_idx], targets[dev_idx].float()
        samples = [self.dataset[int(i)] for i in idx]
        return (torch.stack([s["image"] for s in samples]).to(self.device),
                torch.stack([s["target"] for s in samples]).to(self.device))

    def _streamed(self, batches):
        """Decode with DataLoader workers, one batch of indices per item."""
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches],
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield (batch["image"].to(self.device, non_blocking=True),
                   batch["target"].to(self.device, non_blocking=True))

    def epoch(self, epoch: int, first_iteration: int, start_step: int = 0) -> Iterator:
        """Batches of `epoch` (1-based) from step `start_step`; `first_iteration` numbers the epoch's first step."""
        perm = epoch_permutation(len(self.dataset), self.seed, epoch)
        plan = []
        for step in range(start_step, len(self)):
            global_idx = perm[step * self.global_batch:(step + 1) * self.global_batch]
            it = first_iteration + step
            idx, flips = self._rank_slice(global_idx, iteration_flips(len(global_idx), self.seed, it))
            plan.append((it, idx, flips))
        if self.tensors is not None or self.num_workers == 0:
            loaded = (self._load(idx) for _, idx, _ in plan)
        else:
            loaded = self._streamed([idx for _, idx, _ in plan])
        for (it, _, flips), (images, targets) in zip(plan, loaded):
            images, targets = random_flip(images, targets, flips)
            yield it, images, targets
