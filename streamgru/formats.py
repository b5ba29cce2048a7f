"""Native files: the model file (``.sgru``) and state snapshots, plus ``load``, the one front door.

Both native files are valid safetensors files (8-byte little-endian header length, a JSON
header, then raw little-endian tensor data), so any safetensors reader can inspect them. The
header's ``__metadata__`` says what the file is:

* ``format``: ``"streamgru-model"`` or ``"streamgru-state"``; ``format_version``: ``"1"``, or
  ``"2"`` for a model file with compact weights (below);
* ``checksum``: SHA-256 over the rest of the header (canonical JSON) and the data section, so a
  truncated or bit-flipped file is refused rather than loaded as garbage;
* model files: ``config`` (layer configuration JSON), ``fingerprint`` (see
  ``Model.fingerprint``), ``source``;
* state files: ``model_fingerprint``, ``key_kind`` (``int``/``str``), ``count``, ``state_size``,
  ``dtype``, and optionally ``metadata`` (a JSON object chosen by the caller, e.g. how much input a
  checkpoint covers: it is written by the same atomic write as the states, so the two cannot
  disagree). Tensors ``states`` (count, state_size), and ``keys`` (int64) or ``key_bytes``
  (uint8, UTF-8) + ``key_offsets`` (int64, count + 1); optionally ``last_observed`` (count,
  input_size), each stream's last observed input values (``Engine(missing="last")``). A reader
  that does not know it ignores it, so snapshots with it keep format version 1.

Model files
-----------
Every tensor of layer ``i`` is stored as ``layers.{i}.{name}`` (``name`` as the layer's
``tensors()`` gives it: ``W``, ``R``, ``Wb``, ...). A layer's **weight matrices** are its 2-D
tensors (rows are outputs), its **vectors** its 1-D tensors (biases, peepholes).

``format_version "1"``, full precision
    Every tensor as the model holds it, float32 (``F32``) or float64 (``F64``), and no
    ``weights`` entry. What every streamgru release writes, and what ``save`` still writes
    when the weights are not compact (byte for byte as before).

``format_version "2"``, compact weights (``model.save(path, weights="int8" | "float16")``)
    ``__metadata__`` adds ``weights``: ``"int8"`` or ``"float16"``. Vectors are float32
    (``F32``); each weight matrix ``layers.{i}.{name}`` (M, K) is stored in that form, as
    :mod:`streamgru.compact` defines it:

    * ``"float16"``: ``F16`` (M, K), the matrix rounded to half precision;
    * ``"int8"``: ``I8`` (M, K) ``q`` in [-127, 127], plus ``layers.{i}.{name}.scale``, ``F32``
      (M,), one positive scale per row; the matrix is ``q * scale[:, None]``.

    The stored form is exactly ``compact.quantize`` of the matrix it stands for (``q``, scale
    and halves map back to themselves), so a loaded model holds the float32 dequantized
    matrices, has ``stored_as`` set to the form, and an engine storing its weights in that
    form packs exactly the file's values. ``fingerprint`` is the loaded (dequantized) model's.
    Anything else is refused with a ``FormatError`` naming the file and the tensor: a matrix
    in another dtype, a missing or extra ``.scale``, a scale of the wrong shape or dtype, not
    finite or not positive, ``q = -128``, a form ``compact.quantize`` would not write, a
    ``weights`` value other than these two, or a tensor the model does not hold.

    The version is 2 because a version-1 reader would refuse an ``I8``/``F16`` tensor with a
    message about its dtype (it knows only F32, F64, I64, U8); at version 2 it says that the
    file needs a newer streamgru instead. Full-precision files stay at version 1 so that
    every release reads them.

Files are parsed with explicit limits (header size, tensor extents within the file) before
anything is allocated, and nothing in them is ever executed: no pickle anywhere.

Reading untrusted files
-----------------------
Every loader (native and converters) reads through :func:`read_file`: only a regular file is
read (it is opened with ``O_NONBLOCK`` and the opened descriptor is checked, so a FIFO or device
swapped in after any earlier check cannot block or feed us forever), and never more than
:data:`MAX_READ_BYTES`. The same limit bounds every size a file claims before it is allocated
(:func:`check_size`): an archive member's decompressed size, an HDF5 dataset, an ONNX tensor.
:func:`content_errors` turns the errors our own validation raises about a file's contents into
:class:`~streamgru.FormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import compact
from .errors import FormatError, NonFiniteError, UnsupportedModelError
from .layers import layer_class
from .model import Model

__all__ = ["save_model", "load_model", "model_to_bytes", "model_from_bytes", "save_state", "load_state",
           "load", "write_atomic", "read_file", "read_json", "check_size", "content_errors",
           "is_native", "MAX_READ_BYTES", "MAX_STATE_BYTES"]

FORMAT_VERSION = "1"
#: The model file's version when its weight matrices are compact (float16, int8).
COMPACT_FORMAT_VERSION = "2"
MODEL_FORMAT = "streamgru-model"
STATE_FORMAT = "streamgru-state"
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: The most bytes any loader reads from one file, and the largest size a file may claim for
#: anything it makes us allocate (a tensor, an archive member once decompressed). 256 MiB holds
#: 64 million float32 values: a GRU stack far beyond what one CPU steps per call, or a snapshot
#: of a million streams of 64 values. Looked up at each read, so assigning
#: ``streamgru.formats.MAX_READ_BYTES = n`` before loading a larger file you trust takes effect
#: at once (it is process-wide, as the files a process trusts are).
MAX_READ_BYTES = 256 * 1024 * 1024
#: The largest state snapshot (``.sgst``) written or read: a million streams of 512 float32
#: values fit in 2 GiB, so 8 GiB leaves room while a crafted header cannot make a load allocate
#: more. A snapshot is read only when its header accounts for the file's size exactly, so this
#: bound is reached only by a file that really is that large. Like MAX_READ_BYTES, looked up at
#: each read or write.
MAX_STATE_BYTES = 8 * 1024 * 1024 * 1024
_READ_CHUNK = 1024 * 1024

_DT_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8",
             np.dtype(np.float16): "F16", np.dtype(np.int8): "I8"}
# The tensor dtypes each format version may hold: version 1 (state snapshots and full-precision
# models) those of every release, version 2 (compact models) float32 vectors and compact matrices.
_VERSION_DTYPES = {FORMAT_VERSION: {"F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
                                    "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8)},
                   COMPACT_FORMAT_VERSION: {"F32": np.dtype(np.float32),
                                            "F16": np.dtype(np.float16),
                                            "I8": np.dtype(np.int8)}}
_SCALE = ".scale"  # suffix of an int8 matrix's row scales in a compact model file


# ----------------------------------------------------------------------------------------------
# safetensors container with a checksum


def _checksum(header_wo_checksum: dict, data: bytes | memoryview) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header_wo_checksum, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def _encode(tensors: dict, metadata: dict) -> bytes:
    header, chunks, off = {}, [], 0
    for name, arr in tensors.items():
        dt = np.dtype(np.asarray(arr).dtype.name)  # native byte order
        st = _DT_TO_ST[dt]
        raw = np.ascontiguousarray(arr, dtype=dt.newbyteorder("<")).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    data = b"".join(chunks)
    meta = {k: str(v) for k, v in metadata.items()}
    header["__metadata__"] = meta
    meta["checksum"] = _checksum({**header, "__metadata__": {k: v for k, v in meta.items()
                                                           if k != "checksum"}}, data)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    return struct.pack("<Q", len(hbytes)) + hbytes + data


def _decode(buf: bytes, path, expected_format: str, versions=(FORMAT_VERSION,)):
    """Parse and verify a native file of one of ``versions``. Returns (metadata, {name: array})."""
    where = f"{path}"
    if len(buf) < 8:
        raise FormatError(f"{where}: expected a streamgru file, got {len(buf)} bytes (truncated?)")
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(buf):
        raise FormatError(f"{where}: expected a header within the file (at most "
                          f"{MAX_HEADER_BYTES} bytes), got a header length of {hlen} in a "
                          f"{len(buf)}-byte file (truncated or not a streamgru file)")
    try:
        header = json.loads(bytes(buf[8:8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{where}: expected a JSON header, got unreadable bytes "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise FormatError(f"{where}: expected a safetensors header with __metadata__, got none")
    meta = header["__metadata__"]
    fmt = meta.get("format")
    if fmt != expected_format:
        raise FormatError(f"{where}: expected a {expected_format} file, got format {fmt!r}")
    ver = meta.get("format_version")
    if ver not in versions:
        raise FormatError(f"{where}: expected {expected_format} format_version "
                          f"{' or '.join(map(repr, versions))}, got {ver!r}; this streamgru "
                          f"cannot read it (upgrade streamgru, or re-save the file)")
    dtypes = _VERSION_DTYPES[ver]
    data = memoryview(buf)[8 + hlen:]
    claimed = meta.get("checksum")
    actual = _checksum({**header, "__metadata__": {k: v for k, v in meta.items()
                                                  if k != "checksum"}}, data)
    if claimed != actual:
        raise FormatError(f"{where}: expected checksum {claimed}, got {actual}: the file is "
                          f"truncated or corrupted")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) \
                and info["dtype"] not in dtypes:
            raise FormatError(f"{where}: tensor {name!r}: expected dtype "
                              f"{', '.join(dtypes)} (format_version {ver}), got "
                              f"{info['dtype'][:20]!r}")
        try:
            dt = dtypes[info["dtype"]]
            if not all(type(v) is int for v in (*info["shape"], *info["data_offsets"])):
                raise TypeError
            shape = tuple(info["shape"])
            b, e = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: tensor {name!r}: expected dtype/shape/data_offsets, got "
                              f"{str(info)[:200]}") from None
        # Python ints: a product of claimed dimensions cannot wrap around as int64 would.
        if any(s < 0 for s in shape) or not 0 <= b <= e <= len(data) \
                or (e - b) != math.prod(shape) * dt.itemsize:
            raise FormatError(f"{where}: tensor {name!r}: expected {shape} {dt} within the data "
                              f"section, got offsets {b}..{e} of {len(data)} bytes")
        tensors[name] = np.frombuffer(data[b:e], dtype=dt.newbyteorder("<")).astype(dt) \
            .reshape(shape)
    return meta, tensors


def write_atomic(path, payload: bytes):
    """Write ``payload`` to ``path`` so that a crash leaves either the old file or the new one.

    Temp file in the same directory, fsync the file, rename over ``path``, fsync the directory.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600; give it the mode a plain open() would (umask applies).
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _umask():
    # Linux reports the umask without changing it; os.umask() must set one to read it, which is
    # not thread-safe, so it is only the fallback.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def check_size(path, what, nbytes):
    """Refuse ``nbytes`` claimed by ``path`` for ``what`` if it exceeds :data:`MAX_READ_BYTES`.

    For sizes a file declares before we allocate them (an archive member's decompressed size,
    an HDF5 dataset, an ONNX tensor): a small file must not make us allocate gigabytes.

    Raises
    ------
    FormatError
        Naming the file, what claimed the size, and the limit.
    """
    limit = MAX_READ_BYTES
    if nbytes > limit:
        raise FormatError(f"{path}: {what}: expected at most {limit} bytes "
                          f"(streamgru.formats.MAX_READ_BYTES), got a claim of {nbytes} bytes; "
                          f"if you trust this file, raise streamgru.formats.MAX_READ_BYTES")


def read_file(path, what="path", *, offset=0, length=None, limit=None) -> bytes:
    """The bytes of a regular file, at most :data:`MAX_READ_BYTES` of them.

    The file is opened with ``O_NONBLOCK`` and the opened descriptor is checked with ``fstat``:
    a FIFO, a device (``/dev/zero``), a directory or a socket is refused without reading, and a
    FIFO swapped in after a check on the path cannot block the open. A file larger than the
    limit (a sparse file of gigabytes included) is refused before anything is read; one that
    grows while it is read is refused once it passes the limit.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        The argument's name, for messages.
    offset, length : int
        Read ``length`` bytes (None: to the end) from ``offset``; both must lie within the file.
    limit : int, optional
        The most bytes to read (default: :data:`MAX_READ_BYTES`, looked up now).

    Raises
    ------
    TypeError
        ``path`` is not a path.
    OSError
        The OS refuses the file (FileNotFoundError, PermissionError).
    FormatError
        Not a regular file, larger than the limit, or ``offset``/``length`` beyond its end.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "f")
    >>> with open(p, "wb") as f:
    ...     _ = f.write(b"abc")
    >>> read_file(p)
    b'abc'
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what}: expected a file path, got {type(path).__name__}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise FormatError(f"{what}: expected a regular file, got {os.fspath(path)!r}, "
                              f"{kind}; streamgru reads models and snapshots only from regular "
                              f"files")
        setting = "streamgru.formats.MAX_READ_BYTES" if limit is None else "the given limit"
        limit = MAX_READ_BYTES if limit is None else limit
        size = st.st_size
        end = size if length is None else offset + length
        if offset < 0 or end < offset or end > size:
            raise FormatError(f"{what}: expected bytes {offset}..{end} within {os.fspath(path)!r}, "
                              f"got a file of {size} bytes")
        if end - offset > limit:
            raise FormatError(f"{what}: expected a file of at most {limit} bytes "
                              f"({setting}), got {os.fspath(path)!r} of "
                              f"{end - offset} bytes; if you trust it, raise {setting}")
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with f:
        if offset:
            f.seek(offset)
        # One read of the size fstat reported (one allocation); then read on in chunks, since a
        # file may grow after fstat or report size 0 (procfs), until its end or past the limit.
        parts, total = [], 0
        cap = limit if length is None else length
        while length != 0:
            want = end - offset - total if total < end - offset else _READ_CHUNK
            chunk = f.read(min(want, cap + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if length is not None and total >= length:
                break
            if total > limit:
                raise FormatError(f"{what}: expected a file of at most {limit} bytes "
                                  f"({setting}), got {os.fspath(path)!r}, "
                                  f"which grew past it while being read")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if length is not None and len(data) != length:
        raise FormatError(f"{what}: expected {length} bytes at offset {offset} of "
                          f"{os.fspath(path)!r}, got {len(data)} (the file shrank)")
    return data


def read_json(path, what="path"):
    """Parse a JSON file read with :func:`read_file`; unreadable JSON is a FormatError."""
    data = read_file(path, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what}: expected a JSON file, got {os.fspath(path)!r} that is not "
                          f"valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc


@contextlib.contextmanager
def content_errors(path):
    """Inside this block, a ValueError/TypeError/KeyError/IndexError/RecursionError about the
    contents of the file ``path`` becomes a :class:`FormatError` naming the file (the original
    kept as ``__cause__``).

    Wrap only the code that interprets a file's contents: these are the errors that indexing
    and validating parsed data (JSON objects, arrays) raise when the file is inconsistent.
    :class:`UnsupportedModelError` (a readable model using a feature streamgru does not run)
    and :class:`FormatError` pass unchanged.
    """
    try:
        yield
    except (FormatError, UnsupportedModelError):
        raise
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise FormatError(f"{os.fspath(path)}: expected a consistent model file, got "
                          f"{type(exc).__name__}: {str(text)[:300]}") from exc


# ----------------------------------------------------------------------------------------------
# model files


def save_model(model: Model, path, weights=None):
    """Write ``model`` to ``path`` (atomically), its weight matrices in form ``weights`` (see
    :func:`model_to_bytes`). See the module docstring for the layout."""
    write_atomic(path, model_to_bytes(model, weights))


def model_to_bytes(model: Model, weights=None) -> bytes:
    """The native model file's bytes, in memory (what :func:`save_model` writes).

    ``weights``: ``None`` (default: ``model.stored_as``, full precision when it is None),
    ``"float32"`` (full precision: a format version 1 file, every tensor as the model holds it),
    ``"float16"`` or ``"int8"`` (a compact, version 2 file of ``model.compacted(weights)``: the
    weight matrices in that form, the vectors in float32; the model must be float32, so that no
    vector is rounded without being asked).

    Examples
    --------
    >>> from streamgru import Model
    >>> from streamgru.formats import model_from_bytes, model_to_bytes
    >>> m = Model.random(2, 4)
    >>> model_from_bytes(model_to_bytes(m)).fingerprint == m.fingerprint
    True
    >>> m8 = model_from_bytes(model_to_bytes(m, "int8"))
    >>> m8.stored_as, m8.fingerprint == m.compacted("int8").fingerprint
    ('int8', True)
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected a GRUModel, got {type(model).__name__}")
    weights = compact.weights_format(model.stored_as or "float32" if weights is None else weights)
    if weights == "float32":
        meta = {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(model.config(), sort_keys=True),
            "fingerprint": model.fingerprint,
            "source": model.source or "",
        }
        return _encode(model.named_tensors(), meta)
    if model.dtype != np.float32:
        raise ValueError(f"weights: expected a float32 model for weights={weights!r} (a compact "
                         f"file keeps the vectors in float32), got a {model.dtype} model; save "
                         f"model.astype('float32'), which rounds the vectors, or pass "
                         f"weights='float32'")
    small = model.compacted(weights)
    tensors = {}
    for name, t in small.named_tensors().items():
        if t.ndim != 2:
            tensors[name] = t
            continue
        stored, scales = compact.quantize(t, weights, name)
        tensors[name] = stored
        if scales is not None:
            tensors[name + _SCALE] = scales
    meta = {
        "format": MODEL_FORMAT,
        "format_version": COMPACT_FORMAT_VERSION,
        "weights": weights,
        "config": json.dumps(small.config(), sort_keys=True),
        "fingerprint": small.fingerprint,
        "source": small.source or "",
    }
    return _encode(tensors, meta)


def model_from_bytes(buf) -> Model:
    """Read a model from the bytes of a native model file (see :func:`model_to_bytes`), bit-exact."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise TypeError(f"buf: expected bytes, got {type(buf).__name__}")
    return _model_from_bytes(bytes(buf), "buf")


def load_model(path) -> Model:
    """Read a native model file written by :func:`save_model`, bit-exact."""
    return _model_from_bytes(read_file(path, "path"), path)


def _expand_compact(tensors, weights, path):
    """The float32 tensors a compact file's stored ``tensors`` stand for (module docstring):
    vectors as they are, matrices dequantized, each checked to be the form ``compact.quantize``
    writes, so that the loaded model can claim ``stored_as``."""
    scales = {name[:-len(_SCALE)]: t for name, t in tensors.items() if name.endswith(_SCALE)}
    if scales and weights != "int8":
        name = next(iter(scales))
        raise FormatError(f"{path}: tensor {name + _SCALE!r}: expected no row scales in a "
                          f"weights={weights!r} file (only int8 matrices have them), got one")
    out = {}
    for name, t in tensors.items():
        if name.endswith(_SCALE):
            continue
        where = f"{path}: tensor {name!r}"
        if t.ndim == 1:
            if t.dtype != np.float32:
                raise FormatError(f"{where}: expected a float32 vector in a compact file, got "
                                  f"{t.dtype}")
            out[name] = t
            continue
        if t.ndim != 2:
            raise FormatError(f"{where}: expected a vector or a weight matrix, got shape "
                              f"{t.shape}")
        if t.dtype != compact.WEIGHT_FORMATS[weights]:
            raise FormatError(f"{where}: expected the weight matrix in {weights} in a "
                              f"weights={weights!r} file, got {t.dtype}")
        if weights == "float16":
            out[name] = t.astype(np.float32)  # exact; a non-finite half is refused by its layer
            continue
        s = scales.pop(name, None)
        if s is None:
            raise FormatError(f"{where}: expected its row scales {name + _SCALE!r} in an int8 "
                              f"file, got none")
        if s.dtype != np.float32 or s.shape != (t.shape[0],):
            raise FormatError(f"{path}: tensor {name + _SCALE!r}: expected ({t.shape[0]},) "
                              f"float32, one scale per row of {name!r}, got {s.shape} {s.dtype}")
        bad = np.flatnonzero(~(np.isfinite(s) & (s > 0)))
        if bad.size:
            raise FormatError(f"{path}: tensor {name + _SCALE!r}: expected finite positive "
                              f"scales, got {str(s[bad[0]])} at row {bad[0]}")
        if (t == -128).any():
            at = tuple(int(i) for i in np.argwhere(t == -128)[0])
            raise FormatError(f"{where}: expected int8 values in [-127, 127] (symmetric), got "
                              f"-128 at index {at}")
        W = compact.dequantize_int8(t, s)
        q, s2 = compact.quantize_int8(W)
        differ = np.flatnonzero((q != t).any(axis=1) | (s2 != s))
        if differ.size:
            raise FormatError(f"{where}: expected the int8 form streamgru.compact.quantize_int8 "
                              f"writes (a nonzero row reaches +-127, an all-zero row has scale "
                              f"1, and the scale maps back to itself), got row {differ[0]} in "
                              f"another form; re-save the model with streamgru")
        out[name] = W
    if scales:
        name = next(iter(scales))
        raise FormatError(f"{path}: tensor {name + _SCALE!r}: expected the row scales of an int8 "
                          f"weight matrix {name!r}, got no such matrix")
    return out


def _model_from_bytes(buf: bytes, path) -> Model:
    meta, tensors = _decode(buf, path, MODEL_FORMAT, (FORMAT_VERSION, COMPACT_FORMAT_VERSION))
    weights = meta.get("weights")
    if meta["format_version"] == COMPACT_FORMAT_VERSION:
        if weights not in ("float16", "int8"):
            raise FormatError(f"{path}: weights: expected 'float16' or 'int8' in a "
                              f"format_version {COMPACT_FORMAT_VERSION!r} file, got {weights!r}")
        tensors = _expand_compact(tensors, weights, path)
    elif weights is not None:
        raise FormatError(f"{path}: weights: expected none in a format_version "
                          f"{FORMAT_VERSION!r} file (full precision), got {weights!r}")
    try:
        config = json.loads(meta["config"])
        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise ValueError(f"config: expected an object with a list of layers, got "
                             f"{str(config)[:100]}")
        layers = []
        for i, cfg in enumerate(config["layers"]):
            t = {name[len(f"layers.{i}."):]: arr for name, arr in tensors.items()
                 if name.startswith(f"layers.{i}.")}
            try:
                cls = layer_class(cfg["kind"] if isinstance(cfg, dict) else None)
            except ValueError as exc:  # the registry lists the kinds this streamgru runs
                raise FormatError(f"{path}: layers[{i}]: {exc}") from None
            try:  # the layer names its bad argument ("R: expected finite values ..."): say whose
                layers.append(cls.from_config(cfg, t))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"layers.{i}.{exc}") from None
        model = Model(layers, source=meta.get("source") or None, stored_as=weights)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: expected a valid streamgru model description, got an "
                          f"inconsistent file ({type(exc).__name__}: {exc})") from None
    if weights is not None:
        # A version-1 file's extra tensors were always ignored; a compact file is new, so it
        # holds exactly the model's tensors and their scales.
        extra = sorted(set(tensors) - set(model.named_tensors()))
        if extra:
            raise FormatError(f"{path}: tensor {extra[0]!r}: expected only the tensors of the "
                              f"model's layers (and int8 row scales), got this one too")
    if model.fingerprint != meta.get("fingerprint"):
        raise FormatError(f"{path}: expected fingerprint {meta.get('fingerprint')}, got "
                          f"{model.fingerprint} from the file's contents")
    return model


# ----------------------------------------------------------------------------------------------
# state snapshots


def save_state(path, keys, states, fingerprint, metadata=None, last=None):
    """Write keys + states atomically. ``keys``: list of all-int or all-str; ``states`` (n, S);
    ``last`` (optional): (n, input_size), each stream's last observed input values.

    A state holding NaN/inf is refused (NonFiniteError naming its keys, nothing written): a
    snapshot must load back whole. ``metadata``, if given, is a dict with str keys and JSON
    values (finite numbers), stored in the same file, under the same checksum, and returned by
    ``load_state(..., with_metadata=True)``.
    """
    meta_json = None
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
            raise TypeError(f"metadata: expected a dict with str keys or None, got "
                            f"{type(metadata).__name__}")
        try:
            meta_json = json.dumps(metadata, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata: expected JSON values (str, finite numbers, bool, None, "
                             f"lists, dicts), got {exc}") from None
    n = len(keys)
    finite = np.isfinite(states).all(axis=1) if n else np.ones(0, bool)
    if not finite.all():
        bad = [keys[i] for i in np.flatnonzero(~finite)]
        raise NonFiniteError(f"states: expected finite values, got NaN/inf in the state(s) of key(s) "
                             f"{', '.join(repr(k) for k in bad[:10])}"
                             f"{' ...' if len(bad) > 10 else ''}; nothing was written", bad)
    kind = "str" if (n and isinstance(keys[0], str)) else "int"
    tensors = {"states": np.asarray(states)}
    if last is not None:
        tensors["last_observed"] = np.asarray(last)
    if kind == "int":
        tensors["keys"] = np.array(keys, dtype=np.int64).reshape(n)
    else:
        encoded = [k.encode("utf-8") for k in keys]
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        tensors["key_bytes"] = np.frombuffer(b"".join(encoded), np.uint8)
        tensors["key_offsets"] = offsets
    meta = {
        "format": STATE_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": fingerprint,
        "key_kind": kind,
        "count": n,
        "state_size": tensors["states"].shape[1],
        "dtype": tensors["states"].dtype.name,
    }
    if meta_json is not None:
        meta["metadata"] = meta_json
    payload = _encode(tensors, meta)
    if len(payload) > MAX_STATE_BYTES:
        raise FormatError(f"path: expected a snapshot of at most {MAX_STATE_BYTES} bytes "
                          f"(streamgru.formats.MAX_STATE_BYTES), got {len(payload)} bytes of "
                          f"{n} streams; nothing was written (raise the limit to write, and to "
                          f"load, it)")
    write_atomic(path, payload)


def _read_snapshot(path, what="path"):
    """A snapshot's bytes, read only once its header accounts for the file's size exactly (at
    most :data:`MAX_STATE_BYTES`): a snapshot may be far larger than :data:`MAX_READ_BYTES`
    (every stream of a large engine), so its size is checked against what the header declares
    rather than against the model-file limit."""
    (hlen,) = struct.unpack("<Q", read_file(path, what, length=8, limit=8))
    if hlen > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: expected a header of at most {MAX_HEADER_BYTES} bytes, got a "
                          f"header length of {hlen} (not a streamgru snapshot)")
    try:
        header = json.loads(read_file(path, what, offset=8, length=hlen, limit=hlen).decode("utf-8"))
        end = max([0] + [int(info["data_offsets"][1]) for name, info in header.items()
                         if name != "__metadata__"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError, KeyError,
            IndexError, TypeError, ValueError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{path}: expected a JSON header, got unreadable bytes "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    size = 8 + hlen + end
    if size > MAX_STATE_BYTES:
        raise FormatError(f"{what}: expected a snapshot of at most {MAX_STATE_BYTES} bytes "
                          f"(streamgru.formats.MAX_STATE_BYTES), got {os.fspath(path)!r} whose "
                          f"header declares {size}; if you trust it, raise "
                          f"streamgru.formats.MAX_STATE_BYTES")
    if os.stat(path).st_size != size:
        raise FormatError(f"{path}: expected {size} bytes (as its header declares), got "
                          f"{os.stat(path).st_size}: the file is truncated or padded")
    return read_file(path, what, length=size, limit=size)


def load_state(path, fingerprint, state_size, with_metadata=False, with_last=False):
    """Read a snapshot written by :func:`save_state` for the model with ``fingerprint``.

    Returns (keys, states (n, state_size)), and with ``with_metadata=True`` also the ``metadata``
    dict the snapshot was saved with (None if it has none), read from the same bytes. The states
    are returned as stored, NaN/inf included: the caller decides what to do with such streams
    (Engine.load_state refuses them by default, naming their keys, or skips them on request), so
    that one bad row never makes the others unreadable. With ``with_last=True`` the last item
    returned is the ``last_observed`` array (n, input_size) or None when the snapshot has none.
    """
    meta, t = _decode(_read_snapshot(path, "path"), path, STATE_FORMAT)
    if meta.get("model_fingerprint") != fingerprint:
        raise FormatError(f"{path}: expected states saved for model {fingerprint[:16]}..., got "
                          f"states of model {str(meta.get('model_fingerprint'))[:16]}...; load "
                          f"them into an engine of the model that saved them")
    try:
        n = int(meta["count"])
        states = t["states"]
        if states.shape != (n, state_size) or states.dtype.kind != "f":
            raise ValueError(f"states of shape {states.shape} {states.dtype}, expected "
                             f"{(n, state_size)} float32/float64")
        if meta["key_kind"] == "int":
            if t["keys"].dtype != np.int64:
                raise ValueError(f"int keys of dtype {t['keys'].dtype}, expected int64")
            keys = t["keys"].tolist()
        elif meta["key_kind"] == "str":
            raw, off = t["key_bytes"].tobytes(), t["key_offsets"]
            if off.dtype != np.int64 or off.shape != (n + 1,) or off[0] != 0 \
                    or off[-1] != len(raw) or (np.diff(off) < 0).any():
                raise ValueError(f"key_offsets {str(off.tolist())[:100]}, expected {n + 1} "
                                 f"non-decreasing offsets from 0 to {len(raw)}")
            keys = [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(n)]
        else:
            raise ValueError(f"key_kind {meta['key_kind']!r}")
        if len(keys) != n or len(set(keys)) != n:
            raise ValueError("duplicate or missing keys")
        last = t.get("last_observed")
        if last is not None and (last.ndim != 2 or last.shape[0] != n or last.dtype.kind != "f"):
            raise ValueError(f"last_observed of shape {last.shape} {last.dtype}, expected "
                             f"({n}, input_size) float32/float64")
        metadata = None
        if "metadata" in meta:
            metadata = json.loads(meta["metadata"])
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata {str(metadata)[:100]}, expected a JSON object")
    except (KeyError, ValueError, IndexError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: expected a consistent state snapshot, got {exc}") from None
    out = (keys, states, metadata) if with_metadata else (keys, states)
    return out + (last,) if with_last else out


# ----------------------------------------------------------------------------------------------
# the front door

_FOREIGN = {
    ".onnx": "ONNX (converters.from_onnx)",
    ".pt": "PyTorch state_dict (converters.from_torch)",
    ".pth": "PyTorch state_dict (converters.from_torch)",
    ".safetensors": "streamgru model or PyTorch state_dict in safetensors",
    ".keras": "Keras 3 (converters.from_keras)",
    ".h5": "Keras HDF5 (converters.from_keras)",
    ".json": "RTNeural JSON or a state_dict saved as JSON",
}


def is_native(path):
    """True when ``path`` is a native model file (a ``.safetensors`` may be one or a state_dict)."""
    try:
        (hlen,) = struct.unpack("<Q", read_file(path, offset=0, length=8))
        if hlen > MAX_HEADER_BYTES:
            return False
        header = json.loads(read_file(path, offset=8, length=hlen).decode("utf-8"))
        return header.get("__metadata__", {}).get("format") == MODEL_FORMAT
    except (OSError, ValueError, struct.error, AttributeError, RecursionError):
        # FormatError is a ValueError: a file too short or not regular is not native.
        return False


def load(path, **kwargs) -> Model:
    """Load a model from any supported file, by type.

    ``.sgru`` (native), ``.onnx``, ``.pt``/``.pth``, ``.safetensors`` (native or a PyTorch
    state_dict), ``.keras``, ``.h5``, ``.json`` (RTNeural or state-dict JSON, told apart by
    content). Foreign formats go to the matching function of the ``converters`` package, with
    ``kwargs`` passed through.

    Raises
    ------
    FormatError
        (a ValueError) The file cannot be read: damaged, not what its suffix says, not a
        regular file, or larger (or claiming more) than :data:`MAX_READ_BYTES`. The message
        names the file; a foreign parser's exception is kept as ``__cause__``.
    UnsupportedModelError
        A readable model using a feature streamgru does not run.
    OSError
        The operating system refuses the file (FileNotFoundError, PermissionError).

    Examples
    --------
    >>> import tempfile, os, streamgru
    >>> m = streamgru.Model.random(2, 4)
    >>> p = os.path.join(tempfile.mkdtemp(), "m.sgru")
    >>> m.save(p)
    >>> streamgru.load(p).fingerprint == m.fingerprint
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: expected an existing file, got {str(p)!r}")
    ext = p.suffix.lower()
    if ext == ".sgru" or (ext == ".safetensors" and is_native(p)):
        if kwargs:
            raise TypeError(f"load: a native model takes no options, got {sorted(kwargs)}")
        return load_model(p)
    import converters  # lazily: only foreign formats need it

    if ext == ".onnx":
        return converters.from_onnx(p, **kwargs)
    if ext in (".pt", ".pth", ".safetensors"):
        return converters.from_torch(p, **kwargs)
    if ext in (".keras", ".h5"):
        return converters.from_keras(p, **kwargs)
    if ext == ".json":
        from converters.from_rtneural import is_rtneural_json

        # Each converter reads the file again itself, so that its errors name the file.
        if is_rtneural_json(read_json(p)):
            return converters.from_rtneural(p, **kwargs)
        return converters.from_torch(p, **kwargs)
    kinds = ", ".join(f"{k} ({v})" for k, v in {".sgru": "streamgru native", **_FOREIGN}.items())
    raise ValueError(f"path: expected one of these file types: {kinds}; got {ext or 'no suffix'!r}")
