"""SharedArray: a numpy ndarray whose memory is a named shared segment (data layer).

`SharedArray.create` makes a typed segment (kind ARRAY) and returns a writable ndarray view
of it; `SharedArray.open` in any other process returns the same memory, zero copy. The array
object (and every view sliced from it) keeps the segment mapped, and pickles as
"segment name + position of this view", so `multiprocessing` workers attach to the shared
memory instead of receiving a copy.

On-segment layout (after the 128-byte typed header of layout.py; offsets absolute):

=========  ==========  ==============================================================
offset     size        content
=========  ==========  ==============================================================
0          128         typed header, kind ARRAY; params below
128        1024        lock area: an RWLock (`a.lock`), as many reader slots as fit (<= 64)
1152       meta_len    metadata, UTF-8 JSON: {"dtype": ..., "shape": [...], "order": "C"}
data_off   nbytes      the elements, data_off a multiple of 64 (cache line / SIMD)
=========  ==========  ==============================================================

Header params: [0] array format (1), [1] meta offset, [2] meta length, [3] data offset,
[4] data bytes, [5] lock offset (0: none), [6] lock area bytes.

The dtype is stored as a small JSON tree (`_encode_dtype`), never as a pickle or a string
for eval: a segment is untrusted input (DESIGN invariant 1). Opening re-derives the byte size
from dtype and shape and refuses anything that does not match the segment exactly.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from . import layout, segment as _segment
from .errors import CorruptSegmentError, describe, format_size
from .layout import Kind
from .segment import Segment

ARRAY_FORMAT = 1
LOCK_OFFSET = layout.PAYLOAD_OFFSET          # 128
LOCK_AREA = 1024
META_OFFSET = LOCK_OFFSET + LOCK_AREA        # 1152
DATA_ALIGNMENT = 64
META_MAX = 1 << 20                           # a structured dtype description never needs more
_DTYPE_DEPTH_MAX = 32
_MAX_DIMS = 64                               # numpy's own limit (NPY_MAXDIMS in numpy 2)
_INTP_MAX = 2**63 - 1                        # numpy's largest dimension and byte size

# A plain dtype string as numpy's dtype.str writes it: byte order, kind letter, item size,
# optional datetime unit ("<M8[ns]"). Anything else in a segment is refused before numpy sees it.
_DTYPE_STR = re.compile(r"[<>|=][biufcmMSUV][0-9]{1,10}(\[[0-9]{0,10}[A-Za-z]{1,3}\])?")


def _lock_class():
    """The RWLock class from the sync layer, or None while it is not available."""
    try:
        from .sync import RWLock
    except ImportError:
        return None
    return RWLock


# -- dtype <-> JSON (no pickle, no eval) --------------------------------------------------------

def _encode_dtype(dt: np.dtype):
    """A JSON-able description of `dt` from which `_decode_dtype` rebuilds an equal dtype."""
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return {"sub": _encode_dtype(base), "shape": list(shape)}
    if dt.names is not None:
        fields = []
        for name in dt.names:
            fdt, offset, *title = dt.fields[name]
            fields.append({"name": name, "dtype": _encode_dtype(fdt), "offset": offset,
                           "title": title[0] if title and isinstance(title[0], str) else None})
        return {"fields": fields, "itemsize": dt.itemsize, "aligned": bool(dt.isalignedstruct)}
    return {"str": dt.str}


def _decode_dtype(obj, depth: int = 0) -> np.dtype:
    """Rebuild a dtype from its JSON description; ValueError on anything unexpected."""
    if depth > _DTYPE_DEPTH_MAX:
        raise ValueError("dtype description nested too deeply")
    if not isinstance(obj, dict):
        raise ValueError("dtype description is not an object")
    if set(obj) == {"str"}:
        text = obj["str"]
        if not isinstance(text, str) or not _DTYPE_STR.fullmatch(text):
            raise ValueError(f"unsupported dtype string {text!r}")
        return np.dtype(text)
    if set(obj) == {"sub", "shape"}:
        shape = obj["shape"]
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(type(n) is int and 0 <= n < 1 << 40 for n in shape)):
            raise ValueError("bad sub-array shape")
        return np.dtype((_decode_dtype(obj["sub"], depth + 1), tuple(shape)))
    if set(obj) == {"fields", "itemsize", "aligned"}:
        fields, itemsize = obj["fields"], obj["itemsize"]
        if not isinstance(fields, list) or type(itemsize) is not int or not 0 <= itemsize < 1 << 40:
            raise ValueError("bad structured dtype")
        names, formats, offsets, titles = [], [], [], []
        for field in fields:
            if not isinstance(field, dict) or set(field) != {"name", "dtype", "offset", "title"}:
                raise ValueError("bad field description")
            name, offset, title = field["name"], field["offset"], field["title"]
            if not isinstance(name, str) or type(offset) is not int or offset < 0:
                raise ValueError("bad field name or offset")
            if title is not None and not isinstance(title, str):
                raise ValueError("bad field title")
            names.append(name)
            formats.append(_decode_dtype(field["dtype"], depth + 1))
            offsets.append(offset)
            titles.append(title)
        spec = {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}
        if any(t is not None for t in titles):
            spec["titles"] = titles
        return np.dtype(spec, align=bool(obj["aligned"]))
    raise ValueError("unknown dtype description")


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in shared memory; "
                        f"use fixed-size types (numbers, 'S'/'U' strings, structured)")
    if dt.itemsize == 0:
        raise TypeError(f"dtype {dt} has no size; give the string length, e.g. 'S16' or 'U16'")
    return dt


def _shape_problem(dims, itemsize: int) -> str | None:
    """Why numpy cannot make an array of `dims` x `itemsize` bytes (None: it can).

    numpy refuses a dimension above 2**63 - 1, and a size whose product overflows even when
    counting zero-length dimensions as 1 ("array is too big").
    """
    total = itemsize
    for n in dims:
        if n > _INTP_MAX:
            return f"dimension {n} exceeds numpy's limit of {_INTP_MAX}"
        total *= max(n, 1)
    if total > _INTP_MAX:
        return f"{' x '.join(map(str, dims))} elements of {itemsize} bytes exceed numpy's limit"
    return None


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, not {type(shape).__name__}") from None
    for n in dims:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"shape must hold ints, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"shape must not be negative: {dims}")
    if len(dims) > _MAX_DIMS:
        raise ValueError(f"shape has {len(dims)} dimensions; numpy allows {_MAX_DIMS}")
    return tuple(int(n) for n in dims)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# -- the shared owner of a mapping -------------------------------------------------------------

class _Mapping:
    """What every view of one attached SharedArray shares: the Segment and its data window.

    Views hold it (through `_shm`), it holds the Segment, and the numpy buffer holds an export
    of the mapping: the memory stays mapped until the last view is gone.
    """

    __slots__ = ("segment", "data", "data_offset", "lock_offset", "_lock", "__weakref__")

    def __init__(self, seg: Segment, data_offset: int, nbytes: int, lock_offset: int) -> None:
        self.segment = seg
        self.data_offset = data_offset
        self.data = seg.buf[data_offset:data_offset + nbytes]
        self.lock_offset = lock_offset
        self._lock = None

    def address(self) -> int:
        return self.segment.address + self.data_offset

    def lock(self):
        """The RWLock of the array, attached on first use (most users never touch it)."""
        if self._lock is None:
            cls = _lock_class()
            if cls is None:
                raise RuntimeError("SharedArray.lock needs shmkit.sync.RWLock, which is not "
                                   "available")
            if not self.lock_offset:
                raise RuntimeError(f"SharedArray {describe(self.segment.name, self.segment.backend)} "
                                   f"was created without a lock")
            if self.segment.readonly:
                raise RuntimeError(f"SharedArray {describe(self.segment.name, self.segment.backend)} "
                                   f"is attached readonly: taking its lock needs write access; "
                                   f"open it with readonly=False")
            # Bounded by the lock area: a damaged slot count must not let readers write
            # into the metadata or the elements.
            try:
                self._lock = cls.at(self.segment, self.lock_offset, size_limit=LOCK_AREA)
            except CorruptSegmentError:
                seg = self.segment
                raise CorruptSegmentError(
                    f"SharedArray {describe(seg.name, seg.backend)} is damaged: its lock area "
                    f"does not hold a valid RWLock; the elements may still be read, but remove "
                    f"it with `shmkit rm {seg.name}` and create it again") from None
        return self._lock


def _read_meta(seg: Segment, header: layout.Header) -> tuple[np.dtype, tuple[int, ...], str, int, int, int]:
    """Validate the ARRAY payload of `seg`; returns (dtype, shape, order, data_off, nbytes, lock_off).

    Raises:
        CorruptSegmentError: any field disagrees with the segment (untrusted input).
    """
    where = describe(seg.name, seg.backend)

    def corrupt(why: str) -> CorruptSegmentError:
        return CorruptSegmentError(f"SharedArray {where} is damaged: {why}; remove it with "
                                   f"`shmkit rm {seg.name}` and create it again")

    fmt, meta_off, meta_len, data_off, nbytes, lock_off, lock_size = header.params[:7]
    if fmt != ARRAY_FORMAT:
        raise corrupt(f"unknown array format {fmt}")
    size = seg.size
    if meta_off != META_OFFSET or not 0 < meta_len <= META_MAX or meta_off + meta_len > size:
        raise corrupt(f"impossible metadata position ({meta_len} bytes at {meta_off})")
    if (data_off % DATA_ALIGNMENT or data_off < meta_off + meta_len or data_off > size
            or nbytes > size - data_off):
        raise corrupt(f"impossible data position ({nbytes} bytes at {data_off} in {size})")
    if lock_off not in (0, LOCK_OFFSET) or (lock_off and lock_size != LOCK_AREA):
        raise corrupt(f"impossible lock position ({lock_size} bytes at {lock_off})")
    try:
        meta = json.loads(bytes(seg.buf[meta_off:meta_off + meta_len]).decode("utf-8"))
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "order"}:
            raise ValueError("metadata keys are not dtype, shape, order")
        dt = _decode_dtype(meta["dtype"])
        shape = meta["shape"]
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad shape {shape!r}")
        order = meta["order"]
        if order not in ("C", "F"):
            raise ValueError(f"bad order {order!r}")
        if dt.hasobject or dt.itemsize == 0:
            raise ValueError(f"dtype {dt} cannot live in shared memory")
        problem = _shape_problem(shape, dt.itemsize)
        if problem is not None:
            raise ValueError(problem)
    except (ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError) as exc:
        raise corrupt(f"unreadable metadata ({exc})") from None
    expected = math.prod(shape) * dt.itemsize
    if expected != nbytes:
        raise corrupt(f"dtype {dt} and shape {tuple(shape)} need {expected} bytes, the header "
                      f"says {nbytes}")
    return dt, tuple(shape), order, data_off, nbytes, lock_off


def _attach(seg: Segment, header: layout.Header):
    dt, shape, order, data_off, nbytes, lock_off = _read_meta(seg, header)
    return _Mapping(seg, data_off, nbytes, lock_off), dt, shape, order


# -- the ndarray subclass ----------------------------------------------------------------------

class SharedArray(np.ndarray):
    """A numpy array living in a named shared memory segment.

    Create one with `SharedArray.create` or `SharedArray.from_array`, attach to it from any
    process with `SharedArray.open`. Writes through any attached array are seen by every
    other process at once (plain memory: no locking unless you take `a.lock`).

    The array and every view sliced from it keep the segment mapped. Pickling a SharedArray,
    or a view of one, sends the segment name and the view's position, so a
    `multiprocessing.Pool` worker (spawn or fork) gets the same memory, not a copy. Arrays
    computed from it (``a + 1``, fancy indexing) are ordinary private arrays.

    The name stays until removed: `a.unlink()` or `shmkit rm NAME`.
    """

    _shm: _Mapping | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, shape, dtype=float, *, order: str = "C", mode: int = 0o600,
               backend: str = "posix") -> "SharedArray":
        """Create a new zero-filled shared array and return a writable view of it.

        Other processes attach with `SharedArray.open(name)` and see the same elements.

        Args:
            name: segment name (see `Segment.create`).
            shape: an int or a tuple of ints.
            dtype: anything `numpy.dtype` accepts, including structured dtypes; not `object`.
            order: "C" (row-major) or "F" (column-major).
            mode: permission bits of the segment, default owner-only 0o600.
            backend: "posix" or "sysv".

        Returns:
            A writable `SharedArray`.

        Raises:
            SegmentExistsError: the name is taken.
            ResourceLimitError: not enough shared memory.
            TypeError, ValueError: bad shape, dtype or order, before any syscall.
        """
        _segment.validate_name(name)
        _segment.validate_mode(mode)
        _segment.validate_backend(backend)
        dims = _check_shape(shape)
        dt = _check_dtype(dtype)
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', not {order!r}")
        problem = _shape_problem(dims, dt.itemsize)
        if problem is not None:
            raise ValueError(f"cannot create SharedArray {name!r} of shape {dims}: {problem}")
        meta = json.dumps({"dtype": _encode_dtype(dt), "shape": list(dims), "order": order},
                          separators=(",", ":")).encode()
        if len(meta) > META_MAX:
            raise ValueError(f"dtype {dt} is too complex to store ({len(meta)} bytes of description)")
        nbytes = math.prod(dims) * dt.itemsize
        data_off = _round_up(META_OFFSET + len(meta), DATA_ALIGNMENT)
        payload = data_off + nbytes - layout.PAYLOAD_OFFSET
        params = (ARRAY_FORMAT, META_OFFSET, len(meta), data_off, nbytes, LOCK_OFFSET, LOCK_AREA)

        def init(seg: Segment) -> None:
            seg.buf[META_OFFSET:META_OFFSET + len(meta)] = meta
            lock_cls = _lock_class()
            if lock_cls is not None:
                readers = 64
                while readers > 1 and lock_cls.size_for(readers) > LOCK_AREA:
                    readers -= 1
                if lock_cls.size_for(readers) <= LOCK_AREA:  # never spill into the metadata
                    lock_cls.create_at(seg, LOCK_OFFSET, max_readers=readers).close()

        seg, header = layout.create_typed(name, Kind.ARRAY, payload, params, init=init,
                                          backend=backend, mode=mode)
        try:
            return cls._from_segment(seg, header)
        except BaseException:
            seg.unlink()  # we just made it: leave nothing half-usable behind
            seg.close()
            raise

    @classmethod
    def open(cls, name: str, *, readonly: bool = False, backend: str = "posix") -> "SharedArray":
        """Attach to an existing shared array by name, zero copy.

        Args:
            name: the name given to `create`.
            readonly: map it read-only; the returned array is not writeable.
            backend: "posix" or "sysv".

        Raises:
            SegmentNotFoundError: no such segment.
            KindMismatchError: the segment holds another kind of shmkit object.
            CorruptSegmentError: the header or the array description is damaged.
        """
        seg, header = layout.open_typed(name, Kind.ARRAY, backend=backend, readonly=readonly)
        try:
            return cls._from_segment(seg, header)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def from_array(cls, name: str, arr, *, mode: int = 0o600,
                   backend: str = "posix") -> "SharedArray":
        """Create a shared array holding a copy of `arr` (same shape, dtype and memory order).

        Raises:
            The same as `create`.
        """
        src = np.asarray(arr)
        order = "F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C"
        out = cls.create(name, src.shape, src.dtype, order=order, mode=mode, backend=backend)
        try:
            np.copyto(out, src, casting="no")
        except BaseException:
            out.unlink()
            raise
        return out

    @classmethod
    def _from_segment(cls, seg: Segment, header: layout.Header) -> "SharedArray":
        mapping, dt, shape, order = _attach(seg, header)
        try:
            arr = np.ndarray.__new__(cls, shape, dt, buffer=mapping.data, order=order)
        except BaseException:
            _drop(mapping)
            raise
        arr._shm = mapping
        if seg.readonly:
            arr.flags.writeable = False
        return arr

    # -- numpy subclass protocol (modelled on numpy.memmap) -----------------------------------

    def __array_finalize__(self, obj) -> None:
        # A view keeps the mapping; a new array computed from ours (a + 1) shares no memory
        # with it and must not claim to be shared.
        owner = getattr(obj, "_shm", None)
        if owner is not None and np.may_share_memory(self, obj):
            self._shm = owner
        else:
            self._shm = None

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = super().__array_wrap__(arr, context, return_scalar)
        if self is arr or type(self) is not SharedArray:
            return arr
        if return_scalar:
            return arr[()]
        return arr.view(np.ndarray)

    # -- pickling: by name ---------------------------------------------------------------------

    def __reduce_ex__(self, protocol):
        owner = self._shm
        if owner is None or owner.segment.closed:
            return np.asarray(self).__reduce_ex__(protocol)
        base = owner.address()
        start = self.__array_interface__["data"][0] - base
        seg = owner.segment
        return (_rebuild, (seg.name, seg.backend, seg.readonly, start, self.shape,
                           self.strides, self.dtype, bool(self.flags.writeable)))

    def __reduce__(self):
        return self.__reduce_ex__(2)

    # -- shared-memory specific API ------------------------------------------------------------

    def _owner(self) -> _Mapping:
        owner = self._shm
        if owner is None:
            raise ValueError("this array does not live in shared memory (it was computed from a "
                             "SharedArray, not sliced from it)")
        return owner

    @property
    def segment(self) -> Segment:
        """The `Segment` holding the elements."""
        return self._owner().segment

    @property
    def name(self) -> str:
        """The segment name other processes open."""
        return self._owner().segment.name

    @property
    def backend(self) -> str:
        """'posix' or 'sysv'."""
        return self._owner().segment.backend

    @property
    def lock(self):
        """An `RWLock` stored in the segment, shared by every process attached to the array.

        The array itself never takes it: use ``with a.lock.write():`` around multi-element
        updates and ``with a.lock.read():`` around reads that must see them whole.

        Raises:
            RuntimeError: the array is attached readonly (locking writes to the segment).
        """
        return self._owner().lock()

    def unlink(self) -> None:
        """Remove the segment's name so no new process can open it.

        Attached arrays (here and elsewhere) keep working; the memory is freed when the last
        of them is gone. Without an array at hand, `shmkit.segment.unlink(name)` or
        `shmkit rm NAME` does the same.

        Raises:
            SegmentNotFoundError: the name was already removed.
        """
        self._owner().segment.unlink()


def _rebuild(name: str, backend: str, readonly: bool, start: int, shape, strides, dtype,
             writeable: bool) -> SharedArray:
    """Unpickle a SharedArray (or a view of one): attach by name and rebuild the view."""
    seg, header = layout.open_typed(name, Kind.ARRAY, backend=backend, readonly=readonly)
    try:
        mapping, _dt, _shape, _order = _attach(seg, header)
        try:
            arr = _view_at(mapping, start, shape, strides, dtype)
        except BaseException:
            _drop(mapping)
            raise
        arr._shm = mapping
    except BaseException:
        seg.close()
        raise
    if readonly or not writeable:
        arr.flags.writeable = False
    return arr


def _drop(mapping: _Mapping) -> None:
    """Release the data window of a mapping no array uses, so its segment can be closed."""
    try:
        mapping.data.release()
    except BufferError:  # something still exports it: the segment's close will say so
        pass


def _view_at(mapping: _Mapping, start: int, shape, strides, dtype) -> SharedArray:
    """A view of `mapping.data` whose first element is at byte `start` (strides may be negative).

    numpy's constructor rejects any view reaching outside the buffer.
    """
    return np.ndarray.__new__(SharedArray, shape, dtype, buffer=mapping.data, offset=start,
                              strides=strides)


def describe_state(seg: Segment, header: layout.Header) -> dict:
    """Live state for `shmkit inspect`: shape, dtype, order and sizes of the array."""
    dt, shape, order, data_off, nbytes, lock_off = _read_meta(seg, header)
    return {
        "shape": list(shape),
        "dtype": str(dt),
        "order": order,
        "itemsize": dt.itemsize,
        "nbytes": nbytes,
        "size": format_size(nbytes),
        "data_offset": data_off,
        "lock_offset": lock_off or None,
    }
