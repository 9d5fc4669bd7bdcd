"""The compiled loop of :mod:`stripe_platform.ingestion.postgres.pgcopy` (numba), in a module of
its own: importing numba takes over a second, so it is imported on the first snapshot read only.

The loop calls libpq's ``PQgetCopyData`` on the psycopg connection, without the GIL, and writes
every field of every row into column buffers. It is cached on disk (numba's cache, in
__pycache__ beside this file): only the first process ever compiles it, in about 8 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

import llvmlite.binding as llvm
import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic
from psycopg import pq

# What the loop reports besides rows, and the kinds of fields it converts. Dates and timestamps
# are copied in PostgreSQL's form: pgvalues turns them into Arrow's, as it does change data's.
MORE, END, FAILED, BAD_ROW = 0, 1, -2, -3
PLAIN, NUMERIC = 0, 3


def _libpq_path() -> str:
    """The libpq psycopg uses: the loop must call the very library that owns the connection."""
    if pq.__impl__ == "binary":
        import psycopg_binary

        base = os.path.dirname(psycopg_binary.__file__)
        found = glob.glob(os.path.join(base + ".libs", "libpq*.so*"))  # Linux wheels
        found += glob.glob(os.path.join(base, ".dylibs", "libpq*.dylib"))  # macOS wheels
        if found:
            return found[0]
    system = ctypes.util.find_library("pq")
    if system is None:
        raise RuntimeError("cannot find the libpq that psycopg uses")
    return system


# Registered under names of our own: the process may hold other copies of libpq (psycopg2's
# has one), and the loop must call the one that owns the connection.
_libpq = ctypes.CDLL(_libpq_path())
for _name in ("PQgetCopyData", "PQfreemem"):
    _address = ctypes.cast(getattr(_libpq, _name), ctypes.c_void_p).value
    llvm.add_symbol(f"stripe_platform_{_name}", _address)
_get_copy_data = types.ExternalFunction(
    "stripe_platform_PQgetCopyData", types.intc(types.uintp, types.uintp, types.intc)
)
_free_mem = types.ExternalFunction("stripe_platform_PQfreemem", types.void(types.uintp))


@intrinsic
def _bytes_at(typingctx, address):
    """A libpq buffer's address as a pointer the loop can index."""
    signature = types.CPointer(types.uint8)(address)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(inline="always")
def _int(msg, at, width):
    """The big-endian signed integer of ``width`` (1, 2, 4 or 8) bytes at ``msg[at]``: spelt
    out per width, which the compiler turns into one load and a byte swap."""
    if width == 1:  # bool
        return np.int64(msg[at])
    if width == 8:
        value = np.int64(0)
        for k in range(8):
            value = (value << 8) | np.int64(msg[at + k])
        return value
    if width == 4:
        word = (
            (np.uint32(msg[at]) << 24)
            | (np.uint32(msg[at + 1]) << 16)
            | (np.uint32(msg[at + 2]) << 8)
            | np.uint32(msg[at + 3])
        )
        return np.int64(np.int32(word))
    half = (np.uint16(msg[at]) << 8) | np.uint16(msg[at + 1])
    return np.int64(np.int16(half))


@njit(inline="always")
def _room(var, used, more):
    """``var``, grown if it cannot take ``more`` bytes after ``used``."""
    if used + more <= var.size:
        return var
    bigger = np.empty(max(2 * var.size, used + more), np.uint8)
    bigger[:used] = var[:used]
    return bigger


@njit(inline="always")
def _put_text(var, used, text):
    for k in range(len(text)):
        var[used + k] = ord(text[k])
    return used + len(text)


@njit(inline="always")
def _numeric_text(msg, at, var, used):
    """numeric's binary form written as numeric_out writes it (every digit of its display
    scale), at ``var[used]``; returns the new end. ``var`` must have room (see the caller)."""
    ndigits = _int(msg, at, 2)
    weight = _int(msg, at + 2, 2)
    sign = (np.int64(msg[at + 4]) << 8) | msg[at + 5]
    dscale = _int(msg, at + 6, 2)
    if sign == 0xC000:
        return _put_text(var, used, "NaN")
    if sign == 0xD000:
        return _put_text(var, used, "Infinity")
    if sign == 0xF000:
        return _put_text(var, used, "-Infinity")
    if sign == 0x4000:
        var[used] = 45  # "-"
        used += 1
    if weight < 0:
        var[used] = 48  # "0"
        used += 1
    for d in range(weight + 1):  # base-10000 digits before the point
        digit = _int(msg, at + 8 + 2 * d, 2) if d < ndigits else 0
        for unit in (1000, 100, 10, 1):
            if d > 0 or digit >= unit or unit == 1:  # the first group without leading zeros
                var[used] = 48 + (digit // unit) % 10
                used += 1
    if dscale > 0:
        var[used] = 46  # "."
        used += 1
        d, written = weight + 1, 0
        while written < dscale:
            digit = _int(msg, at + 8 + 2 * d, 2) if 0 <= d < ndigits else 0
            for unit in (1000, 100, 10, 1):
                if written < dscale:
                    var[used] = 48 + (digit // unit) % 10
                    used += 1
                    written += 1
            d += 1
    return used


@njit(nogil=True, cache=True)
def read(
    conn, limit, max_bytes, widths, kinds, fixed, valid, var_index, var_at, var_len, var, slot
):
    """Read up to ``limit`` rows of the COPY: fixed-width fields into ``fixed`` and ``valid``
    (a row per column), the bytes of variable-width ones into ``var``.

    A batch also ends once its variable-width bytes pass ``max_bytes``, so that Arrow's 32-bit
    offsets cannot overflow (a single value is at most 1 GB). Returns (rows, status, var),
    ``var`` because it may have grown. A message that does not parse as the query's row (a
    field past its end, a fixed-width field of another size) stops with BAD_ROW."""
    n = 0
    used = 0
    status = MORE
    ncols = widths.size
    while n < limit:
        size = _get_copy_data(conn, slot.ctypes.data, 0)  # blocks, without the GIL
        if size < 0:
            status = END if size == -1 else FAILED
            break
        msg = carray(_bytes_at(slot[0]), size)
        at = 0
        if size >= 19 and msg[0] == 80 and msg[1] == 71 and msg[2] == 67:  # the "PGCOPY" header
            at = 19 + _int(msg, 15, 4)  # after the flags and the header extension
            if at >= size:
                _free_mem(slot[0])
                continue
        if at + 2 > size:
            _free_mem(slot[0])
            status = BAD_ROW
            break
        fields = _int(msg, at, 2)
        at += 2
        if fields == -1:  # the trailer
            _free_mem(slot[0])
            continue
        if fields != ncols:
            _free_mem(slot[0])
            status = BAD_ROW
            break
        for j in range(ncols):
            if at + 4 > size:
                status = BAD_ROW
                break
            length = _int(msg, at, 4)
            at += 4
            width = widths[j]
            if at + max(length, 0) > size or (width > 0 and length >= 0 and length != width):
                status = BAD_ROW
                break
            if (
                kinds[j] == NUMERIC
                and length > 0
                and (length < 8 or length != 8 + 2 * _int(msg, at, 2))
            ):
                status = BAD_ROW
                break
            valid[j, n] = length >= 0
            if width == 0:  # variable width: its bytes (or numeric's text) into var
                start = used
                if length > 0:
                    if kinds[j] == NUMERIC:
                        weight = _int(msg, at + 2, 2)
                        var = _room(var, used, 12 + 4 * max(weight + 1, 1) + _int(msg, at + 6, 2))
                        used = _numeric_text(msg, at, var, used)
                    else:
                        var = _room(var, used, length)
                        var[used : used + length] = msg[at : at + length]
                        used += length
                var_at[var_index[j], n] = start
                var_len[var_index[j], n] = used - start
            elif length < 0:
                fixed[j, n] = 0
            else:
                fixed[j, n] = _int(msg, at, width)
            if length > 0:
                at += length
        _free_mem(slot[0])
        if status != MORE:
            break
        n += 1
        if used >= max_bytes:
            break
    return n, status, var


@njit(nogil=True, cache=True)
def gather(var, at, length, n):
    """One variable-width column's values made contiguous, with their Arrow offsets."""
    offsets = np.empty(n + 1, np.int32)
    offsets[0] = 0
    for i in range(n):
        offsets[i + 1] = offsets[i] + length[i]
    data = np.empty(offsets[n], np.uint8)
    for i in range(n):
        data[offsets[i] : offsets[i + 1]] = var[at[i] : at[i] + length[i]]
    return offsets, data
