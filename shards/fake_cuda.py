"""CUDA without a GPU: tensors that say `device="cuda"` and hold no memory, so the code paths a GPU run takes
(placement, CUDA autocast, host syncs) run on any machine, and full-size models fit in no memory at all.

Inside `FakeCuda()` every tensor is a `FakeTensor` (shapes, dtypes and devices propagate through PyTorch's
meta kernels; no data). A tensor on the host and one on fake CUDA in one op fail as they would on a GPU.
On a PyTorch built without CUDA two process-wide hooks are needed while the context is open, and are
undone when it closes:
  - the device-guard slot for CUDA borrows the no-op guard PyTorch registers for `meta` (C++ asks for a
    guard before `.to("cuda")` and around views, and aborts the process if there is none);
  - the device C++ reads from a fake CUDA tensor is `meta` outside CUDA autocast, while Python always reads
    `cuda`: the autograd engine would otherwise ask the (absent) CUDA runtime for streams. Device
    mismatches are still caught, by the fake kernels, which read the Python device.
What this cannot show: anything a CUDA kernel itself does (bitsandbytes' kernels, the choice among
SDPA's flash / memory-efficient / math kernels, cuDNN), allocator caching and fragmentation, and values.
"""
import contextlib
import ctypes
import os
import threading
import traceback
from typing import Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_CUDA, _META = 1, 14  # c10::DeviceType values
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _guard_registry():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return (ctypes.c_void_p * 21).in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")


@contextlib.contextmanager
def _cuda_guard_hooks():
    from torch._subclasses import fake_tensor as ft

    if torch.backends.cuda.is_built():
        yield
        return
    registry = _guard_registry()
    saved_slot = registry[_CUDA]
    saved_handler = ft._DISPATCH_META_HANDLERS[torch.ops.prim.device.default]
    saved_dispatch = ft.FakeTensor.__dict__["__torch_dispatch__"]

    def device_for_cpp(args):
        d = saved_handler(args)
        # Inside a CUDA autocast region C++ must see `cuda` (autocast casts only CUDA tensors); no backward runs
        # there (checkpointing recomputes under autocast, but that is a forward).
        on = _autocast.cuda_on and _autocast.cuda_on[-1]
        return torch.device("meta") if d.type == "cuda" and not on else d

    def dispatch(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:
            return device_for_cpp(args)
        return saved_dispatch.__func__(cls, func, types, args, kwargs or {})

    saved_normalize = ft.FakeTensor.__dict__["_normalize_fake_device"]

    def normalize(device):
        # A tensor C++ makes from another's options (the autograd engine's zeros for a missing gradient) has
        # the device C++ read, `meta`: it is the fake CUDA tensor's sibling.
        return torch.device("cuda", 0) if device.type == "meta" else saved_normalize.__func__(device)

    registry[_CUDA] = registry[_META]
    ft._DISPATCH_META_HANDLERS[torch.ops.prim.device.default] = device_for_cpp
    ft.FakeTensor.__torch_dispatch__ = classmethod(dispatch)
    ft.FakeTensor._normalize_fake_device = staticmethod(normalize)
    try:
        yield
    finally:
        ft.FakeTensor._normalize_fake_device = saved_normalize
        ft.FakeTensor.__torch_dispatch__ = saved_dispatch
        ft._DISPATCH_META_HANDLERS[torch.ops.prim.device.default] = saved_handler
        registry[_CUDA] = saved_slot


def _forget_memo_entries(t) -> None:
    """Drop the weak-value memo entries (the fake-tensor converter's) that point at `t`: a tensor with weak
    references cannot be swapped, and the memo only saves converting the same tensor twice."""
    import weakref

    for ref in weakref.getweakrefs(t):
        callback = getattr(ref, "__callback__", None)
        # WeakValueDictionary's removal callback holds its dictionary as a default argument (a weak reference).
        for owner in [d() for d in getattr(callback, "__defaults__", None) or () if isinstance(d, weakref.ref)]:
            if isinstance(owner, weakref.WeakValueDictionary) and isinstance(ref, weakref.KeyedRef):
                owner.data.pop(ref.key, None)


@contextlib.contextmanager
def _moves_of_fake_parameters():
    """`nn.Module.to` swaps a fake parameter with its moved copy (`torch.utils.swap_tensors`), which refuses a
    tensor that has weak references; the fake-tensor converter keeps one to every fake parameter."""
    from torch._subclasses.fake_tensor import FakeTensor

    swap = torch.utils.swap_tensors

    def swap_fake(t1, t2):
        for t in (t1, t2):
            if isinstance(t, FakeTensor):
                _forget_memo_entries(t)
        swap(t1, t2)

    torch.utils.swap_tensors = swap_fake
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap


@contextlib.contextmanager
def _fused_attention():
    """SDPA as a GPU runs it. Which kernel SDPA uses is decided by a CUDA kernel; under fake tensors SDPA falls
    back to its math path, which upcasts to fp32 and keeps the [heads, tokens, tokens] probabilities for
    backward (gigabytes at 1024²). Here it calls the kernel an H100 picks for these inputs: flash attention
    for fp16/bf16 with head size up to 256, memory-efficient attention otherwise; after autocast's cast, as
    autocast lists SDPA among the ops it runs in its lower precision. (A function replaced for the duration,
    not a TorchFunctionMode: modes are off inside backward, where checkpointing recomputes attention.)"""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "cuda" or attn_mask is not None or enable_gqa:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        q, k, v = query, key, value
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = (t.to(dtype) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, dropout_p, is_causal,
                                                                       scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


class _Autocast(threading.local):
    cuda_on: List[bool]

    def __init__(self):
        self.cuda_on = []


_autocast = _Autocast()


@contextlib.contextmanager
def _autocast_regions():
    """Keeps, per thread, whether the innermost `torch.autocast` region has CUDA autocast on. Inside an
    autocast kernel C++ hides autocast from itself, so `torch.is_autocast_enabled` cannot tell there."""
    cls = torch.amp.autocast_mode.autocast
    enter, exit_ = cls.__enter__, cls.__exit__

    def entered(self):
        out = enter(self)
        _autocast.cuda_on.append(torch.is_autocast_enabled("cuda"))
        return out

    def exited(self, *exc):
        if _autocast.cuda_on:
            _autocast.cuda_on.pop()
        return exit_(self, *exc)

    cls.__enter__, cls.__exit__ = entered, exited
    try:
        yield
    finally:
        cls.__enter__, cls.__exit__ = enter, exit_


class _CudaWithIndex(TorchFunctionMode):
    """`.to("cuda")` and `.cuda()` with their device index filled in (cuda:0) before C++ sees them: C++ asks the
    device guard for the current device, and the borrowed guard would answer `meta`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            args = tuple(_indexed(a) for a in args)
            kwargs = {k: _indexed(v) for k, v in kwargs.items()}
            if func is torch.Tensor.cuda and not args[1:] and "device" not in kwargs:
                kwargs["device"] = torch.device("cuda", 0)
        return func(*args, **kwargs)


def _indexed(value):
    if isinstance(value, (str, torch.device)) and not isinstance(value, torch.Tensor):
        try:
            d = torch.device(value)
        except (RuntimeError, TypeError):
            return value
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", 0)
    return value


@contextlib.contextmanager
def FakeHost():
    """Fake tensors on the CPU (no CUDA pretence): the memory model's own method, checked against a real run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _moves_of_fake_parameters(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@contextlib.contextmanager
def _cuda_answers(capability: Tuple[int, int]):
    """What code asks torch.cuda about the device: autocast and bf16 support, the compute capability."""
    import torch.cuda.amp.common as amp_common

    saved = amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_capability
    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *a, **k: capability >= (8, 0)
    torch.cuda.get_device_capability = lambda *a, **k: capability
    try:
        yield
    finally:
        amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_capability = saved


@contextlib.contextmanager
def FakeCuda(capability: Tuple[int, int] = (9, 0)):
    """Fake tensors on a fake `cuda:0` of this compute capability (default: an H100's); host tensors made
    before are accepted and become fake on use. `torch.autocast("cuda")` works inside."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Backward on the calling thread: the engine's per-device threads exist only for real devices.
    with _cuda_guard_hooks(), _moves_of_fake_parameters(), _cuda_answers(capability), \
            torch.autograd.set_multithreading_enabled(False), \
            _autocast_regions(), _fused_attention(), FakeTensorMode(allow_non_fake_inputs=True) as mode, \
            _CudaWithIndex():
        yield mode


def _where() -> str:
    """The innermost line of this project's code on the stack (the caller that made the op)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(_PROJECT) and "site-packages" not in frame.filename \
                and not frame.filename.endswith("fake_cuda.py"):
            return f"{os.path.relpath(frame.filename, _PROJECT)}:{frame.lineno}"
    return "outside the project"


class StepAudit(TorchDispatchMode):
    """Watches every op inside it on fake CUDA: host syncs (a value read on the host: `.item()`, `bool()`,
    `.tolist()`), device-to-host copies, and what each floating op computed in.

    A host sync has no value under fake tensors; `sync_value` is what it reads as (True: "finite", "apply the
    step"). `syncs` and `host_copies` are (op, where) pairs; `dtypes` counts (op, output dtype)."""

    def __init__(self, sync_value=True):
        super().__init__()
        self.sync_value = sync_value
        self.syncs: List[Tuple[str, str]] = []
        self.host_copies: List[Tuple[str, str]] = []
        self.dtypes: Dict[Tuple[str, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default:  # a value read on the host
            from torch._subclasses.fake_tensor import FakeTensor

            t = args[0]
            if t.device.type == "cuda":  # a host tensor's value (AdamW's step count) costs no sync
                self.syncs.append((name, _where()))
            if not isinstance(t, FakeTensor):
                return func(*args, **kwargs)
            # A fake tensor has no value to read.
            return type(self.sync_value)(self.sync_value) if t.dtype == torch.bool else \
                (float(self.sync_value) if t.is_floating_point() else int(self.sync_value))
        out = func(*args, **kwargs)
        source = next((a for a in args if isinstance(a, torch.Tensor)), None)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and source is not None:
            if source.device.type == "cuda" and first.device.type == "cpu":
                self.host_copies.append((name, _where()))
            if first.device.type == "cuda" and first.is_floating_point():
                key = (name, str(first.dtype).replace("torch.", ""))
                self.dtypes[key] = self.dtypes.get(key, 0) + 1
        return out


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages on one device type (default: the fake CUDA), each rounded up to the CUDA caching allocator's 512-byte blocks:
    what `torch.cuda.memory_allocated` would say, op by op, and its peak.

    Written here rather than using torch's MemTracker, which hooks a gradient onto every parameter and so
    refuses a frozen base. It counts real tensors as well as fake ones. A storage counts from the first op that makes or uses it (or `hold`) until Python
    frees it (PyTorch keeps one Python object per live storage, so a weak reference ends with it)."""

    BLOCK = 512

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        import weakref

        self.device_type = device_type
        self._weakref = weakref
        self._seen = {}
        self.now = self.peak = 0

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        size = -(-st.nbytes() // self.BLOCK) * self.BLOCK
        self._seen[key] = size
        self._weakref.finalize(st, self._free, key)
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key) -> None:
        self.now -= self._seen.pop(key, 0)

    def hold(self, tensors) -> None:
        """Count tensors that exist before the first op (parameters, buffers, optimizer state)."""
        for t in tensors:
            self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            self._add(t)
        return out
