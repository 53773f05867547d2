"""Which backend runs a call: a small registry keyed by array type.

Array types are detected through ``sys.modules`` (array-api-compat's ``is_cupy_array``
style), so importing fastbn never imports CuPy: a CuPy array can only come from a user
who already imported it.
"""
import os
import sys

import numpy as np

_BACKEND_ENV = "FASTBN_BACKEND"
_BACKEND_NAMES = ("cpu", "reference")

# FASTBN_BACKEND is read on every call (tests and users switch it at run time), from the
# mapping behind os.environ where CPython has one: os.environ.get encodes the key each
# time, 0.6 us of a 20 us small call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_BACKEND_ENV) if hasattr(os.environ, "encodekey") else None
if _ENV_KEY is None or not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


def _backend_env():
    if _ENV_DATA is None:
        return os.environ.get(_BACKEND_ENV)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def is_cupy_array(a):
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def _describe(a):
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}"


def is_dask_array(a):
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(a, dask_array.Array)


def array_family(a):
    """'numpy' for NumPy arrays and array-likes, 'cupy' for CuPy arrays, 'dask' for Dask
    arrays.

    Raises TypeError for array types fastbn cannot take (device arrays of other
    libraries, masked arrays, numpy.matrix)."""
    if is_cupy_array(a):
        return "cupy"
    if isinstance(a, np.ndarray):
        if isinstance(a, (np.ma.MaskedArray, np.matrix)):
            raise TypeError(
                f"fastbn does not accept {_describe(a)} (masks / matrix semantics would be "
                "ignored); pass a plain numpy.ndarray")
        return "numpy"
    if is_dask_array(a):
        return "dask"
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"unsupported array type {_describe(a)}: fastbn takes NumPy arrays, "
                        "CuPy arrays, or array-likes convertible with numpy.asarray")
    return "numpy"


def _cpu_backend():
    global _cpu_module
    if _cpu_module is None:  # imported once; an import statement per call costs ~0.7 us
        from . import _backend_cpu
        _cpu_module = _backend_cpu
    return _cpu_module


_cpu_module = None


def _reference_backend():
    from . import _reference
    return _reference


def _cuda_backend():
    from . import _backend_cupy
    return _backend_cupy


# array family -> backend factory (scipy's spatial.transform registry pattern)
_REGISTRY = {"numpy": _cpu_backend, "cupy": _cuda_backend}


def backend_name_for(*arrays):
    """Name of the backend that runs a call on these arrays ('cpu', 'reference', ...).

    None entries are skipped. Mixed array types raise TypeError naming them; a Dask
    array may come with NumPy per-channel parameters."""
    ndarray = np.ndarray
    for a in arrays:
        if a is not None and type(a) is not ndarray:
            break
    else:  # only NumPy arrays: the common call, fast
        return _host_backend_name()
    family = None
    first = None
    for a in arrays:
        if a is None:
            continue
        f = array_family(a)
        if family is None:
            family, first = f, a
        elif f != family:
            if {family, f} == {"dask", "numpy"}:
                family, first = "dask", (a if f == "dask" else first)
                continue
            raise TypeError(
                f"mixed array types: {_describe(first)} and {_describe(a)}; pass all arrays "
                "of one type (all NumPy or all CuPy)")
    if family == "cupy":
        return "cuda"
    if family == "dask":
        return "dask"
    return _host_backend_name()


def _host_backend_name():
    """'cpu', or the backend FASTBN_BACKEND forces for NumPy arrays."""
    forced = _backend_env()
    if forced:
        if forced not in _BACKEND_NAMES:
            raise ValueError(f"{_BACKEND_ENV} must be one of {_BACKEND_NAMES}, got: {forced!r}")
        return forced
    return "cpu"


def backend_for(*arrays):
    """(name, backend module) for a call on these arrays."""
    name = backend_name_for(*arrays)
    if name == "cuda":
        return name, _cuda_backend()
    if name == "dask":
        from . import _dask
        return name, _dask
    if name == "reference":
        return name, _reference_backend()
    return name, _cpu_backend()


def array_namespace(a):
    """The array namespace of `a`: cupy for CuPy arrays (already imported by the user),
    numpy otherwise."""
    return sys.modules["cupy"] if is_cupy_array(a) else np
