"""How many elements a received data set's header holds, counted before pydicom builds them.

pydicom turns every element and sequence item of a header into Python objects, several hundred bytes each: a
data set of many tiny items costs about 90 times its size in memory (1.5 MB of 200,000 empty items: 130 MB),
so ``ingress.max_instance_mb`` alone would let one hostile instance of a few hundred MB exhaust the node's
memory. :func:`count_elements` walks the encoded header instead: it reads each element's tag and length,
enters sequences (defined or undefined length, explicit or implicit VR, UN holding a sequence), skips every
other value without reading it, and stops at the top-level pixel data. Its cost is bounded by the limit it
is given, not by the file. Where the structure cannot be followed (a value taken for a sequence that is not
one), the walk resumes after the innermost enclosing value of known length; with none to resume after, the rest
of the file must be too short to hold more than the limit. Judging garbage is pydicom's job, bounding its cost is
this module's.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MIN_ELEMENT_BYTES = 8  # the shortest element, item or delimiter: tag and length
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                             b"UV"})
_DATASET, _SEQUENCE, _FRAGMENTS = "dataset", "sequence", "fragments"


class HeaderTooLargeError(ValueError):
    """The header holds more elements and items than allowed."""


def count_elements(fp: BinaryIO, end: int, *, implicit_vr: bool, little_endian: bool, limit: int) -> int:
    """The elements, sequence items and delimiters of the data set from ``fp``'s position to ``end`` (the top-level
    pixel data and what follows it not included); :class:`HeaderTooLargeError` as soon as there are more than
    ``limit``."""
    endian = "<" if little_endian else ">"
    # (what is being read, where it ends or None for an undefined length, implicit VR, its byte order)
    stack: list[tuple[str, int | None, bool, str]] = [(_DATASET, end, implicit_vr, endian)]
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

    def overruns(length: int) -> bool:
        """Whether a value of ``length`` from here would end past the innermost enclosing value of known length."""
        bound = next(frame[1] for frame in reversed(stack) if frame[1] is not None)
        return fp.tell() + length > bound

    def unfollowable() -> int:
        """Structure that cannot be followed and no enclosing value of known length to resume after: pydicom may
        still read on (an element where a sequence item belongs: it reads the rest as that sequence), so what is
        left must be too short to hold more than the limit."""
        left = max(0, end - fp.tell())
        if count + left // MIN_ELEMENT_BYTES > limit:
            raise HeaderTooLargeError(f"header structure lost at byte {fp.tell():,} with {left:,} bytes left: they "
                                      f"could hold more than {limit:,} elements and items")
        return count

    while stack:
        if count > limit:
            raise HeaderTooLargeError(f"more than {limit:,} elements and items in the header")
        kind, stop, implicit, order = stack[-1]
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
                stack.append((_DATASET, None if length == UNDEFINED else fp.tell() + length, implicit, order))
            elif tag == ITEM and kind == _FRAGMENTS and length != UNDEFINED:
                fp.seek(length, io.SEEK_CUR)
            elif stop is None and ((tag == ITEM_END and kind == _DATASET and len(stack) > 1)
                                   or (tag == SEQUENCE_END and kind in (_SEQUENCE, _FRAGMENTS))):
                stack.pop()
            elif tag == ITEM and not resume():  # an item where none belongs, or a fragment of undefined length
                return unfollowable()
            continue
        if len(stack) == 1 and tag in PIXEL_TAGS:
            return count
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
        if vr == b"SQ" or (length != UNDEFINED and vr in (b"UN", None) and _starts_with_item(fp, order)):
            # a sequence; UN's content, and an implicit VR value that holds items, is implicit VR little endian
            inner = (True, "<") if vr == b"UN" else (implicit, order)
            stack.append((_SEQUENCE, None if length == UNDEFINED else fp.tell() + length, *inner))
        elif length == UNDEFINED:
            if vr == b"UN" or (vr is None and implicit):
                stack.append((_SEQUENCE, None, True, "<" if vr == b"UN" else order))
            else:
                stack.append((_FRAGMENTS, None, implicit, order))  # encapsulated pixel data inside an item
        else:
            fp.seek(length, io.SEEK_CUR)
    return count


def _read_length(fp: BinaryIO, order: str, size: int) -> int | None:
    raw = fp.read(size)
    if len(raw) < size:
        return None
    return int(struct.unpack(order + ("L" if size == 4 else "H"), raw)[0])


def _read_vr_and_length(fp: BinaryIO, tag: int, implicit: bool, order: str) -> tuple[bytes | None, int | None]:
    """The element's VR (in implicit VR: SQ where the dictionary says so, else None) and value length."""
    if implicit:
        length = _read_length(fp, order, 4)
        try:
            vr = b"SQ" if dictionary_VR(tag) == "SQ" else None
        except KeyError:  # private or unknown: a sequence only if its value holds items (see count_elements)
            vr = None
        return vr, length
    vr = fp.read(2)
    if len(vr) < 2:
        return vr, None
    if vr in LONG_LENGTH_VRS:
        if len(fp.read(2)) < 2:
            return vr, None
        return vr, _read_length(fp, order, 4)
    return vr, _read_length(fp, order, 2)


def _starts_with_item(fp: BinaryIO, order: str) -> bool:
    """Whether the value at ``fp``'s position begins with an item tag (``fp`` is left where it was)."""
    head = fp.read(4)
    fp.seek(-len(head), io.SEEK_CUR)
    return len(head) == 4 and struct.unpack(order + "HH", head) == (0xFFFE, 0xE000)
