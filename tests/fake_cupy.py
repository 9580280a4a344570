"""A stand-in for the parts of CuPy that epkern's GPU host paths touch, backed by numpy, so that those paths
(argument checks, output allocation, launch-argument packing, streams and events, the LL replay plans) run
on a machine without a GPU. Kernels are recorded, not run; array contents are host memory the kernels never
see. Used by tests/test_gpu_host_paths_cpu.py and bench/bench_host_cpu.py through :func:`installed`.

Only what those paths use is here; anything else raises AttributeError, which is the point: a host path that
starts using more of CuPy shows up as a failing CPU test, not as a surprise on the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import sys
import threading
import types
import weakref

import numpy as np

_ids = itertools.count(1)
_arrays = weakref.WeakValueDictionary()  # device pointer -> the fake array allocated there (the latest)
_registering = False  # only while an emulation may look arrays up (the registry costs host time per array)


_regions: list = []  # (start, uint8 view) of the open FakeRegions' memory: arrays made over it alias it


def _over_memory(ptr, shape, dtype):
    """A numpy view of fake device memory at ``ptr`` (within a FakeRegion: a slice of its buffer; elsewhere, host
    memory the pointer names)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    for start, mem in _regions:
        if start <= ptr and ptr + nbytes <= start + mem.size:
            return mem[ptr - start : ptr - start + nbytes].view(dtype).reshape(shape)
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))
    return raw[:nbytes].view(dtype).reshape(shape)


class UnownedMemory:
    def __init__(self, ptr, size, owner, device_id=None):
        self.ptr, self.size, self.owner = int(ptr), int(size), owner


class MemoryPointer:
    device_id = 0

    def __init__(self, mem, offset=0):
        self.mem, self.offset = mem, int(offset)
        self.ptr = mem.ptr + self.offset


class _Data:
    __slots__ = ("ptr",)
    device_id = 0  # every fake array is on device 0 (as ndarray.device)

    def __init__(self, ptr):
        self.ptr = ptr


class Device:
    attributes = {"MultiProcessorCount": 132}
    pci_bus_id = "0000:00:00.0"

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class ndarray:  # noqa: N801 - CuPy's name
    """A numpy array with a device pointer of its own (its host address, or the memptr given)."""

    def __init__(self, shape, dtype=float, memptr=None, strides=None, *, _np=None, _ptr=None, _keep=None):
        if _np is None and memptr is not None and memptr.ptr:  # over fake device memory (host memory: FakeRegion)
            _np = _over_memory(memptr.ptr, shape, dtype)
        self._a = np.empty(shape, dtype) if _np is None else _np
        self._keep = memptr if memptr is not None else _keep  # as CuPy: the memory (and its owner) stays alive
        if _ptr is not None:
            self._ptr = _ptr
        else:
            self._ptr = memptr.ptr if memptr is not None else self._a.__array_interface__["data"][0]
            if _registering:
                _arrays[self._ptr] = self  # kernels get pointers: emulations find the array again

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _Data(self._ptr))
    device = property(lambda self: Device(0))

    def _same_start(self, a):  # views that begin where this array begins
        return ndarray(None, _np=a, _ptr=self._ptr, _keep=self._keep)

    def view(self, dtype):
        return self._same_start(self._a.view(dtype))

    def __bool__(self):  # as CuPy: only an array of one element has a truth value (ValueError otherwise)
        return bool(self._a)

    def __dlpack__(self, stream=None):  # the host memory under the fake device array, as numpy exports it
        return self._a.__dlpack__()

    def reshape(self, *shape):
        return self._same_start(self._a.reshape(*shape))

    def transpose(self, *axes):
        return self._same_start(self._a.transpose(*axes))

    def __getitem__(self, key):
        sub = self._a[key]
        if not isinstance(sub, np.ndarray):
            return sub
        offset = sub.__array_interface__["data"][0] - self._a.__array_interface__["data"][0]
        return ndarray(None, _np=sub, _ptr=self._ptr + offset, _keep=self._keep)

    def __setitem__(self, key, value):
        src = value._a if isinstance(value, ndarray) else value
        in_stream_order(get_current_stream(), lambda: self._a.__setitem__(key, src))  # a CuPy copy kernel

    def fill(self, value):
        self._a.fill(value)

    def copy(self):
        return ndarray(None, _np=self._a.copy())

    def astype(self, dtype):
        return _allocated(self._a.astype(dtype))

    def get(self):
        return self._a.copy()

    def set(self, a):
        self._a[...] = a

    def __len__(self):
        return len(self._a)


def _allocated(a):
    """A new device array holding ``a``: as CuPy's pool, an allocation of no bytes has address 0 (views of other
    memory keep theirs); kernels must not take "no pointer" for "no argument". Inside ``using_allocator`` the
    memory comes from that allocator, as in CuPy."""
    allocator = getattr(_allocator, "fn", None)
    if allocator is not None and a.size:
        out = ndarray(a.shape, a.dtype, allocator(a.nbytes))
        out._a[...] = a
        return out
    return ndarray(None, _np=a, _ptr=0) if a.size == 0 else ndarray(None, _np=a)


_allocator = threading.local()  # fn: the allocator of using_allocator in this thread


def _default_malloc(nbytes):
    """The allocator outside ``using_allocator``: fresh host memory (CuPy's pool, for the fake)."""
    buf = np.empty(max(int(nbytes), 1), np.uint8)
    return MemoryPointer(UnownedMemory(buf.ctypes.data, buf.nbytes, buf), 0)


def get_allocator():
    return getattr(_allocator, "fn", None) or _default_malloc


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = getattr(_allocator, "fn", None)
    _allocator.fn = allocator
    try:
        yield
    finally:
        _allocator.fn = previous


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a
    return _allocated(np.array(a, dtype=dtype))


def zeros(shape, dtype=float):
    return _allocated(np.zeros(shape, dtype))


def ones(shape, dtype=float):
    return _allocated(np.ones(shape, dtype))


def empty(shape, dtype=float):
    return _allocated(np.empty(shape, dtype))


def full(shape, value, dtype=None):
    return _allocated(np.full(shape, value, dtype))


def asnumpy(a):
    return a._a.copy() if isinstance(a, ndarray) else np.asarray(a)


def ascontiguousarray(a):
    return ndarray(None, _np=np.ascontiguousarray(a._a))


class Event:
    def __init__(self, *args, **kwargs):
        self.done = True

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


_current = threading.local()


class Graph:
    """A captured graph: the launches captured into it (fake driver launches) run again, on the stream it is
    launched on, at each of its launches; its launches are counted."""

    def __init__(self, captured=()):
        self.launched_on = []  # stream ptr of each launch
        self.captured = list(captured)  # fn(stream_ptr) of each captured launch

    def launch(self, stream=None):
        ptr = (stream or get_current_stream()).ptr
        self.launched_on.append(ptr)
        for fn in self.captured:
            fn(ptr)


_streams: dict = {}  # ptr -> Stream (the fake driver finds a capturing stream by its pointer)


class Stream:
    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0 if null else (next(_ids) if ptr is None else ptr)
        _streams[self.ptr] = self
        self.recorded = 0
        self.waits = 0

    def record(self, event=None):
        self.recorded += 1
        event = event if event is not None else Event()
        event.capture = self._origin() if self.is_capturing() else None
        return event

    def wait_event(self, event):
        """As CUDA: waiting for an event recorded inside a capture joins this stream to that capture."""
        self.waits += 1
        origin = getattr(event, "capture", None)
        if origin is not None and origin is not self and origin.is_capturing():
            self._capturing, self.captured, self.joined_to = True, origin.captured, origin
            origin.joined.append(self)

    def _origin(self):
        return getattr(self, "joined_to", None) or self

    def use(self):
        _current.stream = self
        return self

    def synchronize(self):
        pass

    @property
    def done(self):  # cudaStreamQuery: the fake's kernels never run, so its work is always done unless a test hangs it
        return not getattr(self, "hung", False)

    def is_capturing(self):
        return getattr(self, "_capturing", False)

    def begin_capture(self, mode=None):
        self._capturing = True
        self.captured = []
        self.joined = []

    def end_capture(self):
        self._capturing = False
        for other in self.joined:  # streams that joined the capture leave it with its end
            other._capturing, other.joined_to = False, None
        self.joined = []
        return Graph(self.captured)

    def __enter__(self):
        self._prev = get_current_stream()
        return self.use()

    def __exit__(self, *exc):
        self._prev.use()
        return False


def get_current_stream():
    s = getattr(_current, "stream", None)
    if s is None:
        s = _current.stream = Stream(ptr=next(_ids))  # a non-default stream, as run_in_process gives
    return s


def in_stream_order(stream, work) -> None:
    """Device work of the fake (a copy, a memset, an emulated kernel) on ``stream``: done now, or, while the stream
    is being captured into a graph, recorded there and done at each of the graph's launches (as CUDA)."""
    if stream is not None and stream.is_capturing():
        stream.captured.append(lambda ptr: work())
    else:
        work()


def _memset_async(ptr, value, nbytes, stream=0):
    # fake "device" memory is host memory (FakeRegion)
    in_stream_order(_streams.get(int(stream)), lambda: ctypes.memset(ptr, value, nbytes))


def _memcpy_async(dst, src, nbytes, kind, stream=0):
    in_stream_order(_streams.get(int(stream)), lambda: ctypes.memmove(dst, src, nbytes))


def _module():
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = types.SimpleNamespace(
        memsetAsync=_memset_async, memcpyAsync=_memcpy_async, memcpyDeviceToDevice=3, getDevice=lambda: 0
    )
    for name in ("ndarray", "asarray", "zeros", "ones", "empty", "full", "asnumpy", "ascontiguousarray"):
        setattr(cupy, name, globals()[name])
    for name in ("UnownedMemory", "MemoryPointer", "Device", "Event", "Stream", "get_current_stream", "get_allocator",
                 "using_allocator"):  # fmt: skip
        setattr(cuda, name, globals()[name])
    for name in ("bool_", "int8", "uint8", "int32", "uint32", "int64", "uint64", "float32", "uint16"):
        setattr(cupy, name, getattr(np, name))
    cupy.cuda = cuda
    cupy.__path__ = []  # a package, so "import cupy.cuda" finds the submodule below
    return cupy, cuda


def _forget_region(entry) -> None:
    _regions[:] = [e for e in _regions if e is not entry]


class FakeRegion:
    """SymmetricRegion on one rank: a pointer of its own, no peers."""

    def __init__(self, group, nbytes, device):
        self.nbytes = int(nbytes)
        self._mem = np.zeros(max(self.nbytes, 256) // 8 + 1, np.uint64)
        self.ptr = self._mem.ctypes.data
        self._entry = (self.ptr, self._mem.view(np.uint8))
        _regions.append(self._entry)
        weakref.finalize(self, _forget_region, self._entry)  # a region dropped without close() too
        self.peer_ptrs = [self.ptr if r == group.rank else 0 for r in range(group.size)]
        self.peer_table = ndarray(None, _np=np.array(self.peer_ptrs, dtype=np.uint64))
        self.mode = "fake"

    def close(self):
        self.ptr = 0
        _forget_region(self._entry)


class FakeHostMapped:
    def __init__(self, nbytes):
        self.host = np.zeros(max(int(nbytes), 1), np.uint8)
        self.nbytes = self.host.nbytes
        self.device_ptr = self.host.ctypes.data

    def view(self, dtype, offset=0, count=None):
        dtype = np.dtype(dtype)
        count = (self.nbytes - offset) // dtype.itemsize if count is None else count
        return self.host[offset : offset + count * dtype.itemsize].view(dtype)

    def close(self):
        pass


class Launches(list):
    """Every kernel launch: (source, name, defines, grid, block, args)."""


def _array(arg):
    """A kernel argument as the fake array it points to (arrays are passed as themselves or as addresses)."""
    if isinstance(arg, ndarray):
        return arg
    return ndarray(None, _np=np.empty(0, np.uint8), _ptr=0) if int(arg) == 0 else _arrays[int(arg)]


def emulate_ht_notify_one_rank(args):
    """What ht_notify leaves in host-mapped memory for a one-rank group: the rows this rank receives (its
    tokens in is_token_in_rank), the per-expert counts, the first topk_idx entry outside [-1, num_experts) (no peer
    to differ from), then the call's number (written last, as the kernel)."""
    from epkern import kernel_constants as K
    from epkern.gpu.kernels import HT_NOTIFY

    a = {name: args[HT_NOTIFY.index(name)] for name, _ in HT_NOTIFY.args}
    call, in_rank, per_expert = (
        int(a["call"]),
        _array(a["is_token_in_rank"])._a,
        _array(a["num_tokens_per_expert"])._a,
    )
    words = (ctypes.c_int32 * K.get("EPK_HT_NOTIFY_WORDS")).from_address(int(a["host_out"]))
    words[1] = int(in_rank[:, 0].sum())
    words[2] = words[1]  # rows from rank 0 (the only source)
    for e, c in enumerate(per_expert):
        words[3 + e] = int(c)
    idx = _array(a["topk_idx"])._a.reshape(-1)
    bad = np.flatnonzero((idx < -1) | (idx >= int(a["num_experts"])))
    shape, bad_at = K.get("EPK_HT_NOTIFY_SHAPE"), K.get("EPK_HT_NOTIFY_BAD_INDEX")
    words[shape] = 0
    words[bad_at] = int(bad[0]) + 1 if len(bad) else 0
    words[bad_at + 1] = int(idx[bad[0]]) if len(bad) else 0
    words[0] = call


@contextlib.contextmanager
def installed(monkeypatch=None, emulate=None):
    """Fake CuPy in sys.modules, GPU checks passing, SymmetricRegion/HostMapped faked, kernels recorded.
    Yields the list of launches. ``monkeypatch``: pytest's (undone after the test), else undone on exit.
    ``emulate``: {kernel name: fn(args)} run at each real (not dry-run) launch of that kernel."""
    from epkern import _cuda, _cuda_driver, kernel_loader
    from epkern.gpu import runtime
    from epkern.gpu.ll import plans

    global _registering
    launches = Launches()
    cupy, cuda = _module()
    emulate = emulate or {}
    registering, _registering = _registering, bool(emulate) or _registering

    def get_function(source, name, defines=None):
        frozen = dict(defines or {})

        def launch(grid, block, args):
            launches.append((source, name, frozen, grid, block, tuple(args), get_current_stream().ptr))
            if name in emulate and int(args[0]) == 0:
                emulate[name](args)

        launch.kernel = types.SimpleNamespace(ptr=next(_ids))  # RawKernel.kernel.ptr: the CUfunction
        launch.record = lambda grid, block, args, stream_ptr: launches.append(
            (source, name, frozen, grid, block, tuple(args), stream_ptr)
        )
        functions[launch.kernel.ptr] = launch
        return launch

    functions = {}

    class DriverLaunch:
        """epkern._cuda_driver.DriverLaunch over the recorded kernels: a launch is recorded with the stream it
        names, or captured when that stream is capturing (a graph launch records it again)."""

        def __init__(self, function_ptr, grid, block, args):
            self.func = functions[function_ptr]
            self.grid, self.block, self.args = (int(grid),), (int(block),), list(args)

        def set(self, i, value):
            self.args[i] = type(self.args[i])(value)

        def launch(self, stream_ptr):
            args = tuple(self.args)
            fn = lambda ptr: self.func.record(self.grid, self.block, args, ptr)  # noqa: E731
            stream = _streams.get(stream_ptr)
            if stream is not None and stream.is_capturing():
                stream.captured.append(fn)
            else:
                fn(stream_ptr)

    class GraphLaunch:
        """epkern._cuda_driver.GraphLaunch over the recorded kernels: the graph must hold the one captured launch;
        each launch records the DriverLaunch's arguments as they are then (what the node update gives the graph)."""

        def __init__(self, packed, graph):
            assert len(graph.captured) == 1, graph.captured
            self.packed, self.launches = packed, 0

        def launch(self, stream_ptr):
            self.launches += 1
            self.packed.launch(stream_ptr)

    patches = [
        (sys.modules, "cupy", cupy, True),
        (_cuda_driver, "GraphLaunch", GraphLaunch, False),
        (sys.modules, "cupy.cuda", cuda, True),
        (kernel_loader, "get_function", get_function, False),
        (_cuda, "require_gpu", lambda what="": None, False),
        (runtime, "SymmetricRegion", FakeRegion, False),
        (runtime, "HostMapped", FakeHostMapped, False),
        (plans, "DriverLaunch", DriverLaunch, False),  # replays launch through the recorded kernels, not libcuda
    ]
    saved = []
    for target, name, value, is_item in patches:
        if monkeypatch is not None:
            (monkeypatch.setitem if is_item else monkeypatch.setattr)(target, name, value)
        else:
            saved.append((target, name, is_item, target.get(name) if is_item else getattr(target, name)))
            if is_item:
                target[name] = value
            else:
                setattr(target, name, value)
    try:
        yield launches
    finally:
        _registering = registering
        for target, name, is_item, old in reversed(saved):
            if is_item:
                if old is None:
                    target.pop(name, None)
                else:
                    target[name] = old
            else:
                setattr(target, name, old)


def fake_buffer(
    num_nvl_bytes=1 << 24, num_rdma_bytes=0, low_latency_mode=False, processes=True, timeout_s=None, _tuning=None
):
    """A real GPU Buffer of one rank over the fakes (call inside :func:`installed`). ``processes``: outputs
    come from the shared heap, as for MPS processes (a one-rank group is otherwise in-process)."""
    import epkern
    from epkern.group.base import SingleGroup

    buf = epkern.Buffer(
        SingleGroup(),
        num_nvl_bytes=num_nvl_bytes,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=low_latency_mode,
        timeout_s=timeout_s,
        backend="gpu",
        _tuning=_tuning,
    )
    if processes:
        buf._backend.rt.in_process = False
    return buf


def record_kernel_error(buf, code, phase, peer, seen=0, expected=0):
    """What a kernel's report_error leaves in the Buffer's host-mapped error record (claimed last)."""
    rec = buf._backend.rt.error_record
    rec[1:7] = (code, buf.rank, phase, peer, seen, expected)
    rec[0] = 1


def real_launches(launches):
    """The launches that are not first-use dry runs (their first argument, dry_run, is 0)."""
    return [launch for launch in launches if int(launch[5][0]) == 0]


def ht_inputs(T, H, K, E, seed=0):
    """One rank's HT inputs as fake arrays: x (small integers, BF16), topk_idx (K distinct experts of E per
    token), weights, and the layout a one-rank group gets (every token to rank 0)."""
    import cupy
    import ml_dtypes

    rng = np.random.default_rng(seed)
    x = cupy.asarray(rng.integers(-4, 5, (T, H)).astype(ml_dtypes.bfloat16))
    idx = cupy.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64))
    w = cupy.asarray(np.ones((T, K), np.float32))
    per_rank = cupy.asarray(np.array([T], np.int32))
    in_rank = cupy.asarray(np.ones((T, 1), bool))
    per_expert = cupy.asarray(np.full(E, T * K // E, np.int32))
    return x, idx, w, per_rank, in_rank, per_expert


def full_dispatch(buf, inputs, x=None, **kwargs):
    """A non-cached buf.dispatch of :func:`ht_inputs`' ``inputs`` (``x`` instead of theirs if given); keyword
    arguments go to dispatch (topk_weights=None drops the weights)."""
    x0, idx, w, per_rank, in_rank, per_expert = inputs
    kwargs.setdefault("topk_weights", w)
    return buf.dispatch(
        x0 if x is None else x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
        **kwargs,
    )


def addr(arg) -> int:
    """The address a pointer argument carries (a device array passes its own)."""
    return arg.data.ptr if isinstance(arg, ndarray) else int(arg)
