"""Many masks as one column-major run-length encoding that stays on the device.

The generator keeps every candidate mask of an image in this form between the model and the
records: a mask of H*W pixels costs a few bytes per run instead of H*W bytes, so the worst case
(thousands of masks kept) does not hold thousands of full-resolution masks. Encoding, selecting,
concatenating and decoding are batched tensor operations; the official uncompressed RLE
(`{"size": [h, w], "counts": [...]}`) is made on the host at the very end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class RleBatch:
    """B masks of size (h, w), each flattened column-major (Fortran order, x-major).

    A mask is its first pixel's value and the sorted flat positions where the value changes
    (pixel p differs from pixel p - 1). The positions of all masks are concatenated; those of
    mask i are `starts[offsets[i]:offsets[i + 1]]`.
    """

    size: tuple[int, int]  # (h, w)
    first: Tensor  # [B] bool: value of pixel (0, 0)
    starts: Tensor  # [K] int32 (int64 for masks over 2**31 pixels): change positions
    offsets: Tensor  # [B + 1] int64: CSR bounds into `starts`

    def __len__(self) -> int:
        return self.first.shape[0]

    @property
    def device(self) -> torch.device:
        return self.first.device

    @classmethod
    def empty(cls, size: tuple[int, int], device: torch.device | str = "cpu") -> RleBatch:
        h, w = size
        return cls(
            size=(h, w),
            first=torch.zeros(0, dtype=torch.bool, device=device),
            starts=torch.zeros(0, dtype=_position_dtype(h * w), device=device),
            offsets=torch.zeros(1, dtype=torch.int64, device=device),
        )

    @classmethod
    def encode(cls, masks: Tensor) -> RleBatch:
        """Encode masks [B, H, W] bool on their device (one `nonzero`, no host copy)."""
        b, h, w = masks.shape
        if b == 0 or h * w == 0:
            return cls.empty((h, w), masks.device)
        flat = masks.transpose(1, 2).reshape(b, h * w)  # BxHxW -> Bx(W*H), column-major
        # rows of `change` are (mask, p) with pixel p + 1 != pixel p, sorted by mask then p
        change = (flat[:, 1:] != flat[:, :-1]).nonzero()
        per_mask = torch.bincount(change[:, 0], minlength=b)
        return cls(
            size=(h, w),
            first=flat[:, 0].clone(),
            starts=(change[:, 1] + 1).to(_position_dtype(h * w)),
            offsets=_bounds(per_mask),
        )

    @classmethod
    def cat(cls, batches: Sequence[RleBatch]) -> RleBatch:
        """Masks of all batches, in order; the batches must share one size."""
        if not batches:
            raise ValueError("cat needs at least one RleBatch")
        sizes = {batch.size for batch in batches}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate RLEs of different sizes {sorted(sizes)}")
        per_mask = torch.cat([batch.offsets.diff() for batch in batches])
        return cls(
            size=batches[0].size,
            first=torch.cat([batch.first for batch in batches]),
            starts=torch.cat([batch.starts for batch in batches]),
            offsets=_bounds(per_mask),
        )

    def select(self, index: Tensor) -> RleBatch:
        """The masks at `index` ([M] int64 or [B] bool), in that order."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        index = index.to(self.device)
        per_mask = self.offsets.diff()[index]
        offsets = _bounds(per_mask)
        total = int(offsets[-1])  # one host sync: the size of the result
        # output position j of selected mask k comes from offsets[index[k]] + (j - offsets[k])
        owner = torch.repeat_interleave(
            torch.arange(index.shape[0], device=self.device), per_mask, output_size=total
        )
        shift = self.offsets[index] - offsets[:-1]
        source = torch.arange(total, device=self.device) + shift[owner]
        return RleBatch(self.size, self.first[index], self.starts[source], offsets)

    def decode(self) -> Tensor:
        """All masks as [B, H, W] bool on the device (B*H*W bytes: decode in chunks)."""
        h, w = self.size
        b = len(self)
        # toggles[i, p] = 1 where mask i changes at p (and at 0 when its first pixel is set);
        # the running parity is the mask. uint8 sums wrap, but their parity stays exact.
        toggles = torch.zeros((b, h * w), dtype=torch.uint8, device=self.device)
        toggles[self._owners(), self.starts.long()] = 1
        toggles[:, 0] = self.first.to(torch.uint8)
        flat = torch.cumsum(toggles, dim=1, dtype=torch.uint8).bitwise_and_(1).bool()
        return flat.reshape(b, w, h).transpose(1, 2)  # Bx(W*H) column-major -> BxHxW

    def decode_chunks(self, chunk_size: int) -> Iterator[Tensor]:
        """`decode` of consecutive slices of at most `chunk_size` masks."""
        for begin in range(0, len(self), chunk_size):
            index = torch.arange(begin, min(begin + chunk_size, len(self)), device=self.device)
            yield self.select(index).decode()

    def to_counts(self) -> list[np.ndarray]:
        """Official uncompressed RLE counts per mask (int64 arrays, zeros first), on the host.

        Copies the runs to the host once; `counts.tolist()` gives the official `counts`.
        """
        h, w = self.size
        starts = self.starts.cpu().numpy().astype(np.int64)
        offsets = self.offsets.cpu().numpy()
        first = self.first.cpu().numpy()
        counts = []
        for i in range(len(first)):
            cuts = starts[offsets[i] : offsets[i + 1]]
            runs = np.diff(cuts, prepend=0, append=h * w)
            counts.append(np.concatenate(([0], runs)) if first[i] else runs)
        return counts

    def _owners(self) -> Tensor:
        """The mask index of every entry of `starts`, [K] int64."""
        per_mask = self.offsets.diff()
        return torch.repeat_interleave(
            torch.arange(len(self), device=self.device),
            per_mask,
            output_size=self.starts.shape[0],
        )


def _bounds(per_mask: Tensor) -> Tensor:
    """CSR offsets [B + 1] from entry counts [B]."""
    return torch.cat([per_mask.new_zeros(1), per_mask.cumsum(0)]).to(torch.int64)


def _position_dtype(n_pixels: int) -> torch.dtype:
    return torch.int32 if n_pixels <= torch.iinfo(torch.int32).max else torch.int64
