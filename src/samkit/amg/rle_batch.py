"""Many masks as one column-major run-length encoding that stays on the device.

The generator keeps every candidate mask of an image in this form between the model and the
records: a mask of H*W pixels costs a few bytes per run instead of H*W bytes, so the worst case
(thousands of masks kept) does not hold thousands of full-resolution masks. Encoding, selecting,
concatenating and decoding are batched tensor operations. At the very end the batch becomes
the official records' segmentations: binary masks decoded on the device and copied into one
host block (or `np.repeat`ed on the CPU), uncompressed counts made by tensor ops and copied
once, and COCO strings written on the device (`coco_rle.coco_strings`; pycocotools on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from torch import Tensor

from samkit.amg.coco_rle import coco_strings
from samkit.amg.masks import coco_encode_rle

# change positions handled at once when converting on the host (bounds temporary memory)
_CHUNK_RUNS = 1 << 24
# mask pixels decoded at once on a device for host masks (bytes of each pinned staging buffer)
_STAGING_PIXELS = 1 << 26
# pixels per block of the two-level running sum that decodes masks on a device
_SCAN_BLOCK = 4096
# on the CPU, masks whose mean run is shorter than this decode by toggles, others by np.repeat
_TOGGLE_RUN = 64


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
        # the rows are sorted by mask: mask i's run starts begin after those of masks < i (a
        # binary search per mask; bincount's atomics into B bins serialise on a GPU: 192
        # masks of 1000x1500, H100, 1.35 ms a batch)
        owners = change[:, 0].contiguous()
        offsets = torch.searchsorted(owners, torch.arange(b + 1, device=owners.device))
        return cls(
            size=(h, w),
            first=flat[:, 0].clone(),
            starts=(change[:, 1] + 1).to(_position_dtype(h * w)),
            offsets=offsets,
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
        return self.decode_columns().reshape(len(self), w, h).transpose(1, 2)

    def decode_columns(self) -> Tensor:
        """All masks as [B, W*H] bool on the device, each flattened column-major."""
        if self.device.type == "cpu":
            return torch.from_numpy(_decode_host(self))
        return _decode_device(self)

    def decode_chunks(self, chunk_size: int) -> Iterator[Tensor]:
        """`decode` of consecutive slices of at most `chunk_size` masks."""
        for part in self.chunks(max_masks=chunk_size):
            yield part.decode()

    def chunks(
        self, max_masks: int | None = None, max_runs: int | None = None
    ) -> Iterator[RleBatch]:
        """Consecutive slices of at most `max_masks` masks and `max_runs` change positions each.

        A slice holds at least one mask, however many positions it has. One host sync (the
        offsets), then views of the columns: no gather.
        """
        offsets = self.offsets.cpu().numpy()
        begin, b = 0, len(self)
        while begin < b:
            end = b if max_masks is None else min(b, begin + max_masks)
            if max_runs is not None:
                # the last end whose positions fit in max_runs
                fits = np.searchsorted(offsets, offsets[begin] + max_runs, side="right") - 1
                end = min(end, int(fits))
            end = max(end, begin + 1)
            lo, hi = int(offsets[begin]), int(offsets[end])
            yield RleBatch(
                self.size,
                self.first[begin:end],
                self.starts[lo:hi],
                self.offsets[begin : end + 1] - lo,
            )
            begin = end

    def counts(self) -> tuple[Tensor, Tensor]:
        """Official uncompressed counts of all masks, concatenated, on the device.

        Returns ([T] counts, [B + 1] int64 bounds): mask i's counts are
        counts[bounds[i]:bounds[i + 1]] (zeros first: a leading 0 when pixel (0, 0) is set).
        The counts are int64 on a device and of `starts`' dtype on the CPU.
        """
        if self.device.type == "cpu":
            counts, bounds = _counts_host(self)
            return torch.from_numpy(counts), torch.from_numpy(bounds)
        return _counts_device(self)

    def to_counts(self) -> list[np.ndarray]:
        """Official uncompressed RLE counts per mask (integer arrays, zeros first), on the host.

        The arrays are views of a few large buffers, int32 where h*w fits, made chunk by chunk
        on the device and copied once; `counts.tolist()` gives the official `counts`.
        """
        h, w = self.size
        narrow = self.device.type != "cpu" and h * w <= torch.iinfo(torch.int32).max
        per_mask: list[np.ndarray] = []
        for part in self.chunks(max_runs=_CHUNK_RUNS):
            counts, bounds = part.counts()
            counts = (counts.to(torch.int32) if narrow else counts).cpu().numpy()
            bounds = bounds.cpu().numpy()
            per_mask.extend(counts[a:b] for a, b in pairwise(bounds))
        return per_mask

    def to_masks(self) -> np.ndarray:
        """All masks on the host as [B, H, W] bool.

        Mask i, `masks[i]`, is an HxW view into one [B, W, H] block: F-contiguous, the layout
        of the official `rle_to_mask` (a column-major array, transposed). Device batches are
        decoded on the device in chunks, each crossing to the host once.
        """
        h, w = self.size
        if self.device.type == "cpu":
            block = _decode_host(self)
        else:
            block = np.empty((len(self), h * w), dtype=bool)
            _decode_device_to_host(self, block)
        return block.reshape(-1, w, h).transpose(0, 2, 1)  # Bx(W*H) -> BxWxH -> BxHxW

    def to_coco_strings(self) -> list[str]:
        """The COCO compressed RLE `counts` string of every mask, as pycocotools writes them.

        On the host pycocotools' C encoder is fastest; on a device the strings of a chunk of
        masks are built there at once (`coco_strings`) and copied as one byte buffer.
        """
        h, w = self.size
        if self.device.type == "cpu":
            return [
                coco_encode_rle({"size": [h, w], "counts": c})["counts"] for c in self.to_counts()
            ]
        strings: list[str] = []
        for part in self.chunks(max_runs=_CHUNK_RUNS):
            strings.extend(coco_strings(*part.counts()))
        return strings

    def _owners(self) -> Tensor:
        """The mask index of every entry of `starts`, [K] int64."""
        per_mask = self.offsets.diff()
        return torch.repeat_interleave(
            torch.arange(len(self), device=self.device),
            per_mask,
            output_size=self.starts.shape[0],
        )


def _decode_device(rles: RleBatch) -> Tensor:
    """[B, W*H] bool: a toggle at every change position, and the running parity of the toggles.

    The running sum is taken in blocks of `_SCAN_BLOCK` pixels, then over the blocks' totals:
    one scan along each mask's W*H pixels leaves the GPU nearly idle (a few long rows; 3072
    masks of 1000x1500 on an H100: 147 ms of cumsum).
    """
    h, w = rles.size
    b, n = len(rles), h * w
    blocks = -(-n // _SCAN_BLOCK)
    # uint8 sums wrap, but their parity stays exact
    toggles = torch.zeros((b, blocks * _SCAN_BLOCK), dtype=torch.uint8, device=rles.device)
    toggles[rles._owners(), rles.starts.long()] = 1
    toggles[:, 0] = rles.first.to(torch.uint8)
    inner = torch.cumsum(toggles.view(b, blocks, _SCAN_BLOCK), dim=2, dtype=torch.uint8)
    totals = inner[:, :, -1]
    before = torch.cumsum(totals, dim=1, dtype=torch.uint8).sub_(totals)  # earlier blocks' sum
    inner.add_(before[:, :, None]).bitwise_and_(1)
    return inner.view(b, blocks * _SCAN_BLOCK)[:, :n].bool()


def _decode_device_to_host(rles: RleBatch, block: np.ndarray) -> None:
    """Decode device masks into `block` [B, W*H] bool (host), a chunk of masks at a time.

    On CUDA each chunk goes to one of two pinned buffers without blocking, and the host copies
    a buffer into `block` while the device decodes the next chunk.
    """
    h, w = rles.size
    per_chunk = min(len(rles), max(1, _STAGING_PIXELS // max(1, h * w)))
    if per_chunk == 0:
        return
    target = torch.from_numpy(block)
    if rles.device.type != "cuda":
        row = 0
        for part in rles.chunks(max_masks=per_chunk):
            target[row : row + len(part)].copy_(part.decode_columns())
            row += len(part)
        return
    staging = [torch.empty((per_chunk, h * w), dtype=torch.bool, pin_memory=True) for _ in "ab"]
    pending: list[tuple[torch.cuda.Event, int, int] | None] = [None, None]

    def flush(slot: int) -> None:
        if pending[slot] is not None:
            event, row, n = pending[slot]
            event.synchronize()
            target[row : row + n].copy_(staging[slot][:n])
            pending[slot] = None

    row = 0
    for k, part in enumerate(rles.chunks(max_masks=per_chunk)):
        slot = k % 2
        dense = _decode_device(part)  # queued on the current stream
        flush(slot)  # chunk k - 2 leaves its buffer while chunk k decodes
        staging[slot][: len(part)].copy_(dense, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        pending[slot] = (event, row, len(part))
        row += len(part)
    for slot in range(2):
        flush(slot)


def _decode_host(rles: RleBatch) -> np.ndarray:
    """[B, W*H] bool from CPU tensors, mask by mask.

    A noisy mask (mean run under `_TOGGLE_RUN` pixels) is the running parity of toggles at its
    change positions, a uint8 cumsum (sums wrap, their parity stays exact); any other is
    `np.repeat` of alternating values by its run lengths, which is faster for long runs.
    """
    h, w = rles.size
    out = np.empty((len(rles), h * w), dtype=np.uint8)
    rows = torch.from_numpy(out)
    toggles = np.empty(h * w, dtype=np.uint8)
    starts, offsets, first = rles.starts.numpy(), rles.offsets.numpy(), rles.first.numpy()
    alternating = np.arange(int(np.diff(offsets).max(initial=0)) + 2, dtype=np.uint8) & 1
    for i in range(len(rles)):
        cuts = starts[offsets[i] : offsets[i + 1]]
        if cuts.shape[0] * _TOGGLE_RUN > h * w:
            toggles.fill(0)
            toggles[cuts.astype(np.intp)] = 1
            toggles[0] = first[i]
            torch.cumsum(torch.from_numpy(toggles), 0, dtype=torch.uint8, out=rows[i])
            np.bitwise_and(out[i], 1, out=out[i])
        else:
            runs = np.diff(cuts, prepend=0, append=h * w)
            # values alternate from the first pixel's: start the 0, 1, 0, ... pattern at it
            lead = int(first[i])
            out[i] = np.repeat(alternating[lead : lead + runs.shape[0]], runs)
    return out.view(bool)


def _counts_device(rles: RleBatch) -> tuple[Tensor, Tensor]:
    """`RleBatch.counts` with tensor ops on the batch's device."""
    h, w = rles.size
    device = rles.device
    per_mask = rles.offsets.diff()
    lead = rles.first.long()  # a mask whose first pixel is set starts with zero zeros
    bounds = _bounds(per_mask + 1 + lead)
    counts = torch.zeros(int(bounds[-1]), dtype=torch.int64, device=device)
    # ends[j] of mask i: its positions, then h*w; count j is ends[j] - ends[j - 1] (or ends[j])
    ends = torch.cat([rles.starts.long(), counts.new_full((1,), h * w)])
    runs = ends.diff(prepend=ends.new_zeros(1))
    heads = rles.offsets[:-1]  # an empty mask's head is the next head (or the pad): same value
    runs[heads] = ends[heads]
    # position j of mask i lands at j + i + (leading zeros up to and including mask i)
    shift = torch.arange(len(rles), device=device) + lead.cumsum(0)
    k = rles.starts.shape[0]
    into = torch.arange(k, device=device) + torch.repeat_interleave(shift, per_mask, output_size=k)
    counts[into] = runs[:k]
    last = ends[(rles.offsets[1:] - 1).clamp(min=0)]
    counts[bounds[1:] - 1] = torch.where(per_mask > 0, h * w - last, h * w)
    return counts, bounds


def _counts_host(rles: RleBatch) -> tuple[np.ndarray, np.ndarray]:
    """`RleBatch.counts` for CPU tensors in numpy, one subtract per mask straight into place.

    The counts have the dtype of `starts` (int32 unless h*w needs int64). A loop over masks
    with slices beats whole-array scatters here: each position is read once and written once.
    """
    h, w = rles.size
    starts = rles.starts.numpy()
    offsets = rles.offsets.numpy()
    lead = rles.first.numpy()
    bounds = np.concatenate([[0], np.cumsum(np.diff(offsets) + 1 + lead)])
    counts = np.empty(int(bounds[-1]), dtype=starts.dtype)
    for i in range(len(lead)):
        lo, hi, at = int(offsets[i]), int(offsets[i + 1]), int(bounds[i])
        if lead[i]:
            counts[at] = 0
            at += 1
        if hi == lo:
            counts[at] = h * w
            continue
        counts[at] = starts[lo]
        np.subtract(starts[lo + 1 : hi], starts[lo : hi - 1], out=counts[at + 1 : at + hi - lo])
        counts[at + hi - lo] = h * w - starts[hi - 1]
    return counts, bounds


def _bounds(per_mask: Tensor) -> Tensor:
    """CSR offsets [B + 1] from entry counts [B]."""
    return torch.cat([per_mask.new_zeros(1), per_mask.cumsum(0)]).to(torch.int64)


def _position_dtype(n_pixels: int) -> torch.dtype:
    return torch.int32 if n_pixels <= torch.iinfo(torch.int32).max else torch.int64
