"""`IndexedDataset`: the usual way to give `HydraRecorder.step` each sample's training-set index
when a data set yields only (input, target)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a map-style data set so that item i is `(*dataset[i], i)`: with a DataLoader, each
    batch then ends with the indices to pass to `recorder.step(inputs, targets, indices)`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple | list) else (item, index)
