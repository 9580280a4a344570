"""torch tensors in and out of the native API, without copies (issue #19, item 5).

A Buffer call given any ``torch.Tensor`` argument converts every tensor argument to the backend's array type
(CuPy on the GPU backend, numpy on the CPU backend) as a view of the same memory, and returns its array outputs
as torch tensors viewing the outputs' memory. Handles and events stay epkern objects (pass them back as they came).

Dtypes: ``torch.bfloat16`` crosses as 16-bit words viewed as epkern's BF16, ``torch.float8_e4m3fn`` as its bytes
(epkern's e4m3 uint8), float32 / int64 / int32 / bool / uint8 as themselves. On the way back, the data half of
an FP8 pair ``(e4m3 bytes, scales)`` becomes ``torch.float8_e4m3fn`` again and BF16 arrays ``torch.bfloat16``.
Other dtypes cross as DLPack gives them and meet the call's own dtype checks; a dtype DLPack cannot carry (e.g.
``torch.float8_e5m2``) is an ArgumentError naming the argument. Tensors must live where the backend works: CUDA
tensors for the GPU backend, CPU tensors for the CPU backend. On the GPU backend a call given tensors runs with
torch's current stream as CuPy's current stream (it is ordered after torch's work on that stream, and without
``async_finish`` its outputs are ready on it). torch is imported only when a tensor is seen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading

import numpy as np

from .errors import ArgumentError


class _CallDepth(threading.local):
    depth = 0  # torch_stream open in this thread (1): an inner one (deep_ep -> native) adds nothing


_in_call = _CallDepth()


def in_torch_call() -> bool:
    """Whether this thread is inside a call given torch tensors (its arrays are crossings made for the call)."""
    return bool(_in_call.depth)


def is_tensor(obj) -> bool:
    """Whether ``obj`` is a torch tensor (without importing torch if nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def tensors_in(values):
    """The torch tensors among ``values`` and inside the tuples / lists among them (one level: an FP8 pair)."""
    for v in values:
        if is_tensor(v):
            yield v
        elif isinstance(v, tuple | list):
            yield from (e for e in v if is_tensor(e))


def _any_tensor(values) -> bool:
    """Whether ``values`` hold a torch tensor (as :func:`tensors_in`; one pass, torch looked up once: every call of
    the native API asks, ~13 µs a call on an H100 machine as a generator)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    tensor = torch.Tensor
    for v in values:
        if isinstance(v, tensor):
            return True
        if isinstance(v, tuple | list):
            for e in v:
                if isinstance(e, tensor):
                    return True
    return False


def to_array(tensor, name: str, backend: str):
    """A view of ``tensor`` as the backend's array (CuPy for ``"gpu"``, numpy for ``"cpu"``)."""
    import torch

    from .api_checks import BF16

    if backend == "gpu" and not tensor.is_cuda:
        raise ArgumentError(f"{name}: expected a CUDA tensor (the GPU backend), got a tensor on {tensor.device}")
    if backend == "cpu" and tensor.device.type != "cpu":
        raise ArgumentError(f"{name}: expected a CPU tensor (the CPU backend), got a tensor on {tensor.device}")
    try:
        if backend == "gpu" and _in_call.depth:  # inside a call: CuPy's stream is torch's, no ordering needed
            return _in_call_array(tensor)
        as_bf16 = tensor.dtype == torch.bfloat16
        if as_bf16:
            tensor = tensor.view(torch.int16)
        elif tensor.dtype == torch.float8_e4m3fn:
            tensor = tensor.view(torch.uint8)
        if backend == "gpu":  # a direct use: DLPack orders torch's current stream before CuPy's
            import cupy

            arr = cupy.from_dlpack(tensor.detach())
        else:
            arr = np.from_dlpack(tensor.detach())
    except (BufferError, TypeError, KeyError, RuntimeError, ValueError) as exc:
        raise ArgumentError(f"{name}: a tensor of dtype {tensor.dtype} cannot cross to epkern ({exc})") from None
    return arr.view(BF16) if as_bf16 else arr


_MADE_FROM = "_epkern_array"  # attribute of a tensor made by to_tensor inside a call: (array, stride, data_ptr)


def _in_call_array(tensor):
    """Inside a call: the array the tensor was made from, else a new view of it."""
    made = _made_from(tensor)  # not `or`: an array of several elements has no truth value (GPU run, session R)
    return made if made is not None else _cupy_view(tensor)


def _made_from(tensor):
    """The CuPy array a tensor was made from inside an earlier call (``to_tensor``), while the tensor still views
    it unchanged (same address, shape and strides): a layout's outputs passed to ``dispatch``, a dispatch's output to
    ``combine`` cross back without a new array (~12 µs each through ``_cupy_view`` on the H100 machine). None
    otherwise."""
    made = tensor.__dict__.get(_MADE_FROM)
    if made is None:
        return None
    arr, stride, ptr = made
    if tensor.data_ptr() != ptr or tensor.stride() != stride or tensor.shape != arr.shape:
        return None
    return arr


def _cupy_view(tensor):
    """A CuPy array over a CUDA tensor's memory, holding the tensor: built from its pointer, shape and strides, as
    DLPack would describe them but without DLPack's stream handshake (on the H200: 3.7 µs against 29 µs for
    ``cupy.from_dlpack``, whose torch side asks for the current stream; bench/bench_tensor_crossing.py). Used only
    inside a call (``torch_stream``), which runs on torch's current stream, so no ordering is needed. BF16 and FP8
    e4m3 cross as epkern's BF16 and uint8 directly (no view on either side); dtypes DLPack cannot carry are
    refused like DLPack refuses them."""
    import cupy

    if not _NUMPY_OF:
        _NUMPY_OF.update(_numpy_of())
    dtype = _NUMPY_OF.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"torch dtype {tensor.dtype} has no epkern array dtype")
    size = dtype.itemsize
    shape, stride = tuple(tensor.shape), tensor.stride()
    strides = tuple(st * size for st in stride)
    if tensor.numel() == 0:  # nothing to view; the tensor's strides still (as DLPack gives them; CuPy's empty: 0)
        return cupy.ndarray(shape, dtype, cupy.empty(0, dtype).data, strides=strides)
    extent = sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) + 1
    mem = cupy.cuda.UnownedMemory(tensor.data_ptr(), extent * size, tensor, device_id=tensor.get_device())
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0), strides=strides)


def _numpy_of():
    import torch

    from .api_checks import BF16

    pairs = [
        (torch.float32, np.float32),
        (torch.float64, np.float64),
        (torch.float16, np.float16),
        (torch.int64, np.int64),
        (torch.int32, np.int32),
        (torch.int16, np.int16),
        (torch.int8, np.int8),
        (torch.uint8, np.uint8),
        (torch.bool, np.bool_),
        (torch.bfloat16, BF16),
        (torch.float8_e4m3fn, np.uint8),  # FP8 e4m3 crosses as its bytes: CuPy has no float8
    ]
    return {t: np.dtype(n) for t, n in pairs}


_NUMPY_OF: dict = {}  # torch dtype -> numpy dtype, filled at first use (torch is imported only when a tensor is seen)


def to_tensor(arr, fp8: bool = False):
    """A torch tensor viewing ``arr`` (a numpy or CuPy array); ``fp8``: uint8 e4m3 bytes become float8_e4m3fn.
    Inside an epkern call (``torch_stream``, where CuPy's current stream is torch's) a CuPy array crosses as a DLPack
    capsule asked for no stream ordering (``stream=-1``: 2 µs against 7 µs for ``torch.from_dlpack``, which asks
    torch for the current stream first; H200); a direct use goes through ``torch.from_dlpack``, ordered."""
    import torch
    import torch.utils.dlpack

    from .api_checks import BF16

    given = arr
    bf16 = arr.dtype == BF16
    if bf16:
        arr = arr.view(np.int16)
    in_call = False
    if isinstance(arr, np.ndarray):
        out = torch.from_numpy(arr)
    elif _in_call.depth:  # inside a call (torch_stream): no ordering needed
        out = torch.utils.dlpack.from_dlpack(arr.__dlpack__(stream=-1))
        in_call = True
    else:  # a direct use: DLPack orders CuPy's current stream before torch's
        out = torch.from_dlpack(arr)
    if bf16:
        out = out.view(torch.bfloat16)
    elif fp8 and out.dtype == torch.uint8:
        out = out.view(torch.float8_e4m3fn)
    if in_call:  # passed back into a later call, it crosses as ``given`` again (_made_from)
        out.__dict__[_MADE_FROM] = (given, out.stride(), out.data_ptr())
    return out


def _is_array(obj) -> bool:
    if isinstance(obj, np.ndarray):
        return True
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


_PLAIN = frozenset((int, float, bool, str))


def _outputs(result, backend: str):
    """The call's result with every array a torch tensor (an FP8 pair's data half as float8_e4m3fn), and a receive
    hook that runs on torch's current stream when it is called (as the call did)."""
    if result is None or type(result) in _PLAIN:  # scalars, and lists of them (HT's per-expert counts): as they are
        return result
    if type(result) is list and all(type(v) in _PLAIN for v in result):
        return result
    if _is_array(result):
        return to_tensor(result)
    if callable(result):
        return _on_torch_stream(result, backend)
    if isinstance(result, tuple | list):
        fp8_pair = (
            isinstance(result, tuple)
            and len(result) == 2
            and _is_array(result[0])
            and _is_array(result[1])
            and result[0].dtype == np.uint8
            and result[1].dtype in (np.float32, np.int32)
        )
        if fp8_pair:
            return (to_tensor(result[0], fp8=True), to_tensor(result[1]))
        converted = [_outputs(v, backend) for v in result]
        return tuple(converted) if isinstance(result, tuple) else converted
    return result


def prepared_on_torch(prepared, args, kwargs, backend: str):
    """A prepared call (``Buffer.prepare_low_latency_*``) given torch tensors: every run on torch's current stream
    with its outputs as tensors, as the Buffer's method does for a call (a replay goes straight to the engine, past the
    method). ``prepared`` itself where no argument is a tensor."""
    if not (_any_tensor(args) or _any_tensor(kwargs.values())):
        return prepared

    @functools.wraps(prepared)
    def call():
        with torch_stream(backend):
            return _outputs(prepared(), backend)

    return call


def _on_torch_stream(fn, backend: str):
    """``fn`` (a receive hook) running with torch's current stream at the time it is called as CuPy's: a hook
    called under a torch side stream receives in that stream's order, so torch's reads of the outputs there follow
    it. ``functools.wraps`` keeps the hook's attributes (the inputs it holds alive)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch_stream(backend):
            return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def torch_stream(backend: str):
    """GPU backend: torch's current stream is CuPy's current stream for the call, so a call given tensors is
    ordered after the work torch queued for them (a torch side stream too) and its outputs are ready on it. Nested
    (deep_ep's call around the native one) it asks torch only once (``torch.cuda.current_stream()`` costs 5-7 µs)."""
    if backend != "gpu" or _in_call.depth:
        yield
        return
    import cupy
    import torch

    stream = torch.cuda.current_stream()
    _in_call.depth = 1
    try:
        if cupy.cuda.get_current_stream().ptr == stream.cuda_stream:  # both the default stream
            yield
        else:
            with cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index):
                yield
    finally:
        _in_call.depth = 0


def _crossed(value, name: str, backend: str):
    """An argument with its tensors (itself, or the members of a tuple/list: an FP8 pair) as backend arrays."""
    if is_tensor(value):
        return to_array(value, name, backend)
    if isinstance(value, tuple | list) and any(is_tensor(v) for v in value):
        return type(value)(to_array(v, f"{name}[{i}]", backend) if is_tensor(v) else v for i, v in enumerate(value))
    return value


def accepts_tensors(method):
    """Buffer methods: torch tensor arguments in, torch tensors out (see the module docstring). Arguments are named
    from the signature's parameter list directly: ``inspect.Signature.bind`` cost ~30 µs a call."""
    names = list(inspect.signature(method).parameters)[1:]  # after self

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not (_any_tensor(args) or _any_tensor(kwargs.values())):
            return method(self, *args, **kwargs)
        backend = self.backend
        with torch_stream(backend):
            # extra positional arguments keep a placeholder name: the call itself raises TypeError for them
            args = tuple(
                _crossed(v, names[i] if i < len(names) else f"argument {i + 1}", backend) for i, v in enumerate(args)
            )
            kwargs = {k: _crossed(v, k, backend) for k, v in kwargs.items()}
            return _outputs(method(self, *args, **kwargs), backend)

    return call
