"""How many elements a received data set holds, counted before pydicom builds them.

pydicom turns every element and sequence item into Python objects, about 1 KB each: a data set of many tiny items
costs far more memory than its size (1.6 MB of 200,000 empty items: about 250 MB), so ``ingress.max_instance_mb``
alone would let one hostile instance of a few hundred MB exhaust the node's memory. :func:`count_elements` walks
the encoding instead, taking the decisions pydicom's reader (3.x) takes: the VR mode found at the start of the data
set and of each sequence item (pydicom switches to what the first element shows), an explicit VR element whose VR
bytes are not letters read as implicit, UN and unknown private values of undefined length read as sequences, other
undefined-length values (encapsulated pixel data) skipped to their delimiter without counting. It reads each
element's tag and length, enters sequences, skips every other value without reading it, and goes on to the end
(pydicom reads elements after the pixel data too). Its cost is bounded by the limit it is given. Where the
structure cannot be followed (a value taken for a sequence that is not one), the walk resumes after the innermost
enclosing value of known length; with none to resume after, the rest of the file must be too short to hold more
than the limit. Judging garbage is pydicom's job, bounding its cost is this module's.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MIN_ELEMENT_BYTES = 8  # the shortest element, item or delimiter: tag and length
KNOWN_VRS = frozenset(v.encode() for v in VR)  # as pydicom's reader recognises them
LONG_LENGTH_VRS = frozenset(v.encode() for v in EXPLICIT_VR_LENGTH_32)
_DATASET, _SEQUENCE = "dataset", "sequence"
_SCAN_BYTES = 1 << 20


class HeaderTooLargeError(ValueError):
    """The data set holds more elements and items than allowed."""


def count_elements(fp: BinaryIO, end: int, *, implicit_vr: bool, little_endian: bool, limit: int) -> int:
    """The elements, sequence items and delimiters of the data set from ``fp``'s position to ``end``;
    :class:`HeaderTooLargeError` as soon as there are more than ``limit``."""
    order = "<" if little_endian else ">"
    found = _implicit_at(fp)
    # (what is being read, where it ends or None for an undefined length, implicit VR)
    stack: list[tuple[str, int | None, bool]] = [(_DATASET, end, implicit_vr if found is None else found)]
    count = 0

    def resume() -> bool:
        """After structure that cannot be followed: continue after the innermost enclosing value of known length."""
        for depth in range(len(stack) - 1, 0, -1):
            stop = stack[depth][1]
            if stop is not None:
                fp.seek(stop)
                del stack[depth:]
                return True
        return False

    def unfollowable() -> int:
        """Structure that cannot be followed and no enclosing value of known length to resume after: pydicom may
        still read on (an element where a sequence item belongs: it reads the rest as that sequence), so what is
        left must be too short to hold more than the limit."""
        left = max(0, end - fp.tell())
        if count + left // MIN_ELEMENT_BYTES > limit:
            raise HeaderTooLargeError(f"header structure lost at byte {fp.tell():,} with {left:,} bytes left: they "
                                      f"could hold more than {limit:,} elements and items")
        return count

    def overruns(length: int) -> bool:
        """Whether a value of ``length`` from here would end past the innermost enclosing value of known length."""
        bound = next(frame[1] for frame in reversed(stack) if frame[1] is not None)
        return fp.tell() + length > bound

    while stack:
        if count > limit:
            raise HeaderTooLargeError(f"more than {limit:,} elements and items in the header")
        kind, stop, implicit = stack[-1]
        if stop is not None and fp.tell() >= stop:
            stack.pop()
            continue
        head = fp.read(4)
        if len(head) < 4:
            return count
        group, element = struct.unpack(order + "HH", head)
        tag = group << 16 | element
        count += 1
        if tag in (ITEM, ITEM_END, SEQUENCE_END):
            length = _read_length(fp, order, 4)
            if length is None:
                return count
            if tag == ITEM and length != UNDEFINED and overruns(length):
                if resume():
                    continue
                return count
            if tag == ITEM and kind == _SEQUENCE:
                # pydicom reads an item implicit where its sequence is, or where its first element looks implicit
                item_implicit = implicit or bool(_implicit_at(fp))
                stack.append((_DATASET, None if length == UNDEFINED else fp.tell() + length, item_implicit))
            elif stop is None and ((tag == ITEM_END and kind == _DATASET and len(stack) > 1)
                                   or (tag == SEQUENCE_END and kind == _SEQUENCE)):
                stack.pop()
            elif tag == ITEM and not resume():  # an item where none belongs
                return unfollowable()
            continue
        if kind != _DATASET:  # an element where an item should be
            if resume():
                continue
            return unfollowable()
        vr, length = _read_vr_and_length(fp, tag, implicit, order)
        if length is None:
            return count
        if length != UNDEFINED and overruns(length):  # garbage taken for a sequence, or a truncated file
            if resume():
                continue
            return count
        if length == UNDEFINED:
            if vr in (b"SQ", b"UN") or (vr is None and _starts_with_item(fp, order)):
                stack.append((_SEQUENCE, None, implicit))  # pydicom: the items keep the data set's VR mode
            elif not _skip_undefined_value(fp, end, order):  # encapsulated pixel data: skipped, not counted
                return count
        elif vr == b"SQ" or (vr in (b"UN", None) and _starts_with_item(fp, order)):
            # a sequence (pydicom parses it on access, in the data set's VR mode; its items test their own)
            stack.append((_SEQUENCE, fp.tell() + length, implicit))
        else:
            fp.seek(length, io.SEEK_CUR)
    return count


def _read_length(fp: BinaryIO, order: str, size: int) -> int | None:
    raw = fp.read(size)
    if len(raw) < size:
        return None
    return int(struct.unpack(order + ("L" if size == 4 else "H"), raw)[0])


def _read_vr_and_length(fp: BinaryIO, tag: int, implicit: bool, order: str) -> tuple[bytes | None, int | None]:
    """The element's VR and value length. Where the encoding gives no VR (implicit VR, or an explicit element whose
    VR bytes are not two capitals, which pydicom reads as implicit) the VR is the dictionary's, None if unknown."""
    if not implicit:
        vr = fp.read(2)
        if len(vr) < 2:
            return vr, None
        if vr in KNOWN_VRS:
            if vr in LONG_LENGTH_VRS:
                if len(fp.read(2)) < 2:
                    return vr, None
                return vr, _read_length(fp, order, 4)
            return vr, _read_length(fp, order, 2)
        if b"AA" <= vr <= b"ZZ":  # an unknown VR of capitals: pydicom assumes a 2-byte length
            return vr, _read_length(fp, order, 2)
        fp.seek(-2, io.SEEK_CUR)  # not a VR: the 4 bytes after the tag are an implicit length
    length = _read_length(fp, order, 4)
    try:
        return dictionary_VR(tag).encode(), length
    except KeyError:  # private or unknown: a sequence only if its value holds items (see count_elements)
        return None, length


def _implicit_at(fp: BinaryIO) -> bool | None:
    """Whether the element at ``fp``'s position looks implicit VR the way pydicom tests it (its would-be VR bytes
    are not two capitals); None at the end. An item delimiter reads as implicit, harmlessly. ``fp`` stays put."""
    head = fp.read(6)
    fp.seek(-len(head), io.SEEK_CUR)
    if len(head) < 6:
        return None
    return not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)


def _starts_with_item(fp: BinaryIO, order: str) -> bool:
    """Whether the value at ``fp``'s position begins with an item tag (``fp`` is left where it was)."""
    head = fp.read(4)
    fp.seek(-len(head), io.SEEK_CUR)
    return len(head) == 4 and struct.unpack(order + "HH", head) == (0xFFFE, 0xE000)


def count_fragments(fp: BinaryIO, end: int, *, delimited: bool, order: str = "<") -> int:
    """The items (offset table and fragments) of an undefined-length value such as encapsulated pixel data, from
    ``fp``'s position on: each item's header is read and its value skipped, never loaded. ``delimited``: the items
    must end with the sequence delimiter before ``end`` (``fp`` is left after it); otherwise they fill ``fp`` up to
    ``end``. ValueError where they do not."""
    n = 0
    while fp.tell() < end:
        header = fp.read(8)
        if len(header) < 8:
            raise ValueError("an item header is cut short")
        group, element, length = struct.unpack(order + "HHL", header)
        tag = group << 16 | element
        if tag == SEQUENCE_END:
            return n
        if tag != ITEM:
            raise ValueError(f"({group:04X},{element:04X}) where a fragment item should be")
        if length == UNDEFINED or fp.tell() + length > end:
            raise ValueError(f"item {n} claims {length} bytes, {max(0, end - fp.tell())} are left")
        fp.seek(length, io.SEEK_CUR)
        n += 1
    if delimited:
        raise ValueError("the items end without a sequence delimiter (truncated)")
    return n


def _skip_undefined_value(fp: BinaryIO, end: int, order: str) -> bool:
    """Past an undefined-length value that is not a sequence, as pydicom reads it: its items (fragments) one by one
    up to the sequence delimiter, or failing that, a search for the delimiter's bytes. False where none is found."""
    start = fp.tell()
    try:
        count_fragments(fp, end, delimited=True, order=order)
        return True
    except ValueError:
        fp.seek(start)
    delimiter = struct.pack(order + "HH", 0xFFFE, 0xE0DD)
    position = start
    while position < end:
        chunk = fp.read(_SCAN_BYTES)
        if not chunk:
            return False
        at = chunk.find(delimiter)
        if at >= 0:
            fp.seek(position + at + 8)  # the tag and its (zero) length
            return True
        position += max(len(chunk) - 3, 1)  # a delimiter may straddle two chunks
        fp.seek(position)
    return False
