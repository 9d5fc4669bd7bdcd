"""The compiled loop of the columnar change decoder (``pgoutput.tuple_columns``; numba).

Decoding pgoutput's TupleData value by value in Python cost about 20 us per changed Transaction
row, four times the server's own decoding: this loop only finds where each value lies in the
messages (kind, start, length), and whole columns are then gathered (``pgcopy_kernel.gather``)
and typed by Arrow. Cached on disk like ``pgcopy_kernel`` (numba's cache, in __pycache__).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# TupleData value kinds (the byte before each value)
NULL, UNCHANGED, TEXT, BINARY = ord("n"), ord("u"), ord("t"), ord("b")


@njit(nogil=True, cache=True)
def split_tuples(buf, starts, ends, ncols, kinds, at, length):
    """Each message ``buf[starts[i]:ends[i]]`` is an Insert, an Update without an old tuple or a
    Delete: its one TupleData begins at byte 6. Fills, per column and message (arrays of shape
    (columns, messages)), the value's kind, where its bytes start and how many there are (0
    unless text or binary). Returns -1, or the
    index of the first message that is not of that shape (the caller then decodes row by row)."""
    for i in range(starts.shape[0]):
        p = starts[i] + 6
        end = ends[i]
        if p + 2 > end or ((np.int64(buf[p]) << 8) | np.int64(buf[p + 1])) != ncols:
            return i
        p += 2
        for j in range(ncols):
            if p >= end:
                return i
            kind = buf[p]
            kinds[j, i] = kind
            if kind in (TEXT, BINARY):
                if p + 5 > end:
                    return i
                size = (
                    (np.int64(buf[p + 1]) << 24)
                    | (np.int64(buf[p + 2]) << 16)
                    | (np.int64(buf[p + 3]) << 8)
                    | np.int64(buf[p + 4])
                )
                at[j, i] = p + 5
                length[j, i] = size
                p += 5 + size
            elif kind in (NULL, UNCHANGED):
                at[j, i] = 0
                length[j, i] = 0
                p += 1
            else:
                return i
        if p != end:
            return i
    return -1
