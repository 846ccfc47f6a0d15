"""SampleIterator: the micro-batches of one data-parallel rank, resumable from consumed_samples."""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError


class SampleIterator:
    """Infinite iterator of LongTensor [micro_batch_size, seq_length + 1] for rank ``dp_rank`` of ``dp_size``.

    Global samples are consumed in order: at global position g = consumed_samples, rank r reads samples
    g + r*mb ... g + (r+1)*mb - 1 (modulo len(dataset)); each micro-batch advances consumed_samples by
    mb * dp_size on every rank, so restarting with a saved consumed_samples continues exactly.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
            raise ValueError(
                f"bad SampleIterator arguments: micro_batch_size={micro_batch_size}, "
                f"dp_rank={dp_rank}, dp_size={dp_size}, consumed_samples={consumed_samples}"
            )
        if dataset is None or len(dataset) == 0:
            raise DataError("the dataset to iterate over is empty")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = int(consumed_samples)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        n = len(self.dataset)
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        rows = [np.asarray(self.dataset[(first + j) % n]["text"], dtype=np.int64) for j in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return torch.from_numpy(np.stack(rows))
