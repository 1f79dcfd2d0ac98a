"""COCO compressed RLE strings from uncompressed counts, for many masks at once on any device.

The format is pycocotools' `rleToString`: count i (minus count i - 2 for i > 2) is written as
signed 5-bit groups, low group first; bit 0x20 of a character says another group follows, and
each character is offset by 48 to make it printable ASCII. A group sequence stops at the first
group after which the remaining (arithmetically shifted) value is just the sign extension of the
group's bit 0x10, i.e. a value takes the fewest groups whose 5k-bit two's complement holds it.

Here every count of every mask becomes characters through a handful of whole-array tensor ops:
the character count of each value, an exclusive cumsum for where it goes, and one scatter per
group index. On a GPU the strings of thousands of masks are built on the device and cross to the
host as one byte buffer.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

# a value fits in k groups iff |value| (as v ^ (v >> 63)) < 2**(5k - 1); 7 groups hold 35 bits
_MAX_GROUPS = 7
_GROUP_LIMITS = [1 << (5 * k - 1) for k in range(1, _MAX_GROUPS)]


def coco_strings(counts: Tensor, bounds: Tensor) -> list[str]:
    """The COCO `counts` strings of several masks.

    Args:
        counts: [T] int64, the uncompressed counts of all masks, concatenated (any device).
        bounds: [B + 1] int64 on the same device: mask i's counts are counts[bounds[i]:bounds[i+1]];
            every mask has at least one count.
    Returns:
        B str, each exactly what pycocotools' `frPyObjects` / `encode` give (decoded as ASCII).
    """
    if bounds.shape[0] <= 1:
        return []
    total = counts.shape[0]
    counts = counts.long()
    # the count two before, zero at the first three counts of a mask (pycocotools: only i > 2)
    previous = counts.new_zeros(total + 3)
    previous[2:total] = counts[:-2]
    heads = (bounds[:-1, None] + torch.arange(3, device=counts.device)).flatten()
    previous[heads] = 0  # heads past a short mask's end land on the next mask's heads or the pad
    values = counts - previous[:total]
    magnitude = values ^ (values >> 63)  # v for v >= 0, -v - 1 for v < 0
    limits = torch.tensor(_GROUP_LIMITS, dtype=torch.int64, device=counts.device)
    groups = torch.bucketize(magnitude, limits, right=True) + 1  # characters per value, 1..7
    ends = groups.cumsum(0)
    places = ends - groups
    chars = torch.empty(int(ends[-1]), dtype=torch.uint8, device=counts.device)  # one sync
    for g in range(_MAX_GROUPS):
        if g == 0:
            where, v, n = places, values, groups
        else:
            index = (groups > g).nonzero().squeeze(1)
            if index.shape[0] == 0:
                break
            where, v, n = places[index] + g, values[index], groups[index]
        char = ((v >> (5 * g)) & 0x1F) + 48 + (n > g + 1).long() * 0x20
        chars[where] = char.to(torch.uint8)
    string_bounds = torch.cat([ends.new_zeros(1), ends])[bounds].cpu().numpy()
    buffer = memoryview(chars.cpu().numpy())  # the one copy of the characters to the host
    return [str(buffer[a:b], "ascii") for a, b in pairwise(string_bounds)]
