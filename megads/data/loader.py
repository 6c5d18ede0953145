"""Sequence packing over an IndexedDataset, data-parallel batch sharding and exact resume."""
from __future__ import annotations

import numpy as np
import torch

from megads.data.indexed import IndexedDataset


def samples_per_epoch(dataset: IndexedDataset, seq_len: int) -> int:
    """Samples of seq_len + 1 tokens that one epoch packs into (each document followed by eos, the
    tail shorter than a sample dropped): the one count both packing and up-front checks use."""
    return (dataset.num_tokens + len(dataset)) // (seq_len + 1)


class PackedSequences:
    """Documents (each followed by eos) concatenated in a seeded shuffled document order per epoch
    and cut into samples of seq_len+1 tokens (input = s[:-1], target = s[1:]); the tail of an epoch
    shorter than one sample is dropped. Sample i of the infinite stream is a pure function of
    (dataset, seq_len, seed, i). Epoch e orders documents by
    np.random.default_rng(seed + e).permutation(len(dataset))."""

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int, eos_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.seed = seed
        self.eos_id = eos_id
        self._doc_lens = np.diff(dataset.offsets) + 1  # int64 [n_docs], eos included
        self.samples_per_epoch: int = samples_per_epoch(dataset, seq_len)
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"dataset {dataset.prefix} has {dataset.num_tokens + len(dataset)} tokens (eos included), "
                f"shorter than one sample of seq_len+1={seq_len + 1}; use a larger dataset or a smaller seq_len"
            )
        self._epoch = -1
        self._order = self._starts = np.empty(0, np.int64)

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._order = np.random.default_rng(self.seed + epoch).permutation(len(self.dataset))  # [n_docs]
            # stream position where each shuffled doc starts; [n_docs + 1]
            self._starts = np.concatenate(([0], np.cumsum(self._doc_lens[self._order])))
            self._epoch = epoch

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample i: int64 [seq_len + 1]."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, j = divmod(i, self.samples_per_epoch)
        self._load_epoch(epoch)
        n = self.seq_len + 1
        begin, end = j * n, (j + 1) * n
        out = np.empty(n, dtype=np.int64)
        k = int(np.searchsorted(self._starts, begin, side="right")) - 1  # shuffled doc holding `begin`
        pos = begin
        while pos < end:
            doc_start, doc_end = int(self._starts[k]), int(self._starts[k + 1])
            lo, hi = pos - doc_start, min(end, doc_end) - doc_start  # offsets into doc + eos (eos at len(doc))
            doc = self.dataset[int(self._order[k])]
            take = doc[lo : min(hi, len(doc))]
            out[pos - begin : pos - begin + len(take)] = take
            if hi == len(doc) + 1:
                out[doc_start + len(doc) - begin] = self.eos_id
            pos = doc_start + hi
            k += 1
        return torch.from_numpy(out)


class BatchLoader:
    """Yields, for each optimizer step, this data-parallel rank's micro-batches of the global batch.
    Global batch of step s = samples [s*G, (s+1)*G) of the stream; rank r of D takes the contiguous
    slice [r*G/D, (r+1)*G/D); that slice is split into micro-batches of size `micro_batch`.
    `consumed_samples` counts samples of all ranks, so a checkpoint resumes under any dp_size."""

    def __init__(
        self, seqs: PackedSequences, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1
    ):
        if micro_batch < 1 or dp_size < 1 or global_batch < 1:
            raise ValueError(
                f"global_batch ({global_batch}), micro_batch ({micro_batch}) and dp_size ({dp_size}) must be >= 1"
            )
        if global_batch % (dp_size * micro_batch):
            raise ValueError(
                f"global_batch={global_batch} is not divisible by dp_size*micro_batch={dp_size}*{micro_batch}"
                f"={dp_size * micro_batch}; set global_batch to a multiple of {dp_size * micro_batch} "
                f"or change micro_batch"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} out of range for dp_size={dp_size}")
        self.seqs = seqs
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = 0

    @property
    def num_micro_batches(self) -> int:
        """Gradient-accumulation steps per optimizer step on one rank."""
        return self.global_batch // (self.dp_size * self.micro_batch)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next step: list of int64 [micro_batch, seq_len + 1]."""
        per_rank = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        samples = [self.seqs[first + k] for k in range(per_rank)]
        self.consumed_samples += self.global_batch
        return [torch.stack(samples[m : m + self.micro_batch]) for m in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seq_len": self.seqs.seq_len, "seed": self.seqs.seed}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("seq_len", self.seqs.seq_len), ("seed", self.seqs.seed)):
            if key in sd and sd[key] != mine:
                raise ValueError(
                    f"data loader checkpoint has {key}={sd[key]} but this run uses {mine}; the sample stream "
                    f"would differ, so resume with the same {key}"
                )
        self.consumed_samples = int(sd["consumed_samples"])
