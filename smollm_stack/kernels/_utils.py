"""Small helpers shared by the kernel launchers: input checks, output allocation and launch sizes.

Everything here is plain Python around torch (and one fix to Triton's interpreter); the Triton kernels themselves
live with their op.
"""

import contextlib
import os

import torch

class Choice:
    """A setting among ``choices``: $``env`` (else ``default``), and ``override(name)`` for a ``with`` block."""

    def __init__(self, env: str, what: str, choices: tuple[str, ...], default: str):
        self.env, self.what, self.choices = env, what, choices
        self.current = os.environ.get(env, default)

    def value(self) -> str:
        """The setting now; a bad $env is an error here, at the call that uses it, naming the variable."""
        if self.current not in self.choices:
            raise ValueError(f"${self.env} must be one of {self.choices}, got {self.current!r}")
        return self.current

    @contextlib.contextmanager
    def override(self, name: str):
        if name not in self.choices:
            raise ValueError(f"{self.what} must be one of {self.choices}, got {name!r}")
        saved, self.current = self.current, name
        try:
            yield
        finally:
            self.current = saved


def fp32_output_gemm(device: torch.device) -> bool:
    """Whether torch has GEMMs from bf16/fp16 inputs to an fp32 output (``mm``/``bmm(out_dtype=)``, cuBLAS) on this
    device: CUDA with torch >= 2.8, not the CPU."""
    return device.type == "cuda" and "dtype" in torch.ops.aten.mm.overloads()


# The interpreter runs every program in Python, so launch sizes there favour few, large programs.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_scalars_index_as_ints() -> None:
    """Make the interpreter turn a scalar into a Python int the way NumPy 2.4 accepts, on every Triton version.

    The interpreter holds a scalar (a kernel's int argument, program_id, anything computed from them) as a 1-element
    NumPy array. Triton 3.6 turns it into a range bound with int(array), which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171), so every loop whose bound is
    not a constexpr fails: RMSNorm's rows, RoPE's heads, attention's keys. Later Tritons take the array's one element,
    as this does, after the interpreter's own patching of tl.tensor (undone with it when the launch ends). Skipped if
    a Triton no longer has the hook, and where triton is not installed (nothing to interpret).
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "scalar_index_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _interpreter_scalars_index_as_ints()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set POISON = True: every output then starts as NaN, so an element a kernel forgets to write fails the
# comparison instead of passing by luck on recycled memory. Off by default because the fill is a full extra write.
POISON = False


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise a clear TypeError unless t is a fp32, fp16 or bf16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise a clear ValueError when the named tensors do not all live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when POISON is set (float dtypes only)."""
    if POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output in x's memory layout (x's strides where x is dense, else its order of dimensions, packed), so a
    kernel writes a (B, H, T, d) view of (B, T, H, d) storage as such and the caller's transpose back is a view;
    of x's dtype unless given; NaN-filled when POISON is set, like empty."""
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)
    return out.fill_(float("nan")) if POISON and out.dtype.is_floating_point else out


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D (rows, last dim) tensor whose last dim is contiguous; copies only when a view cannot do it."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def flat(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous 1-D tensor (a view when x is already contiguous), for elementwise kernels."""
    return x.contiguous().view(-1)


def num_warps_for(block_elems: int) -> int:
    """Warps for a tile of block_elems elements: about 512 elements (16 B of bf16 per thread-load) per warp."""
    return max(1, min(16, block_elems // 512))


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """How many programs a grid-stride kernel should launch: per_sm per SM on a GPU (no more than fit at once, or the
    last ones start only when the first finish), a handful in the interpreter."""
    if device.type == "cuda" and not INTERPRET:
        per_gpu = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_gpu = 4
    return max(1, min(work_items, per_gpu))


def check_targets(targets: torch.Tensor) -> None:
    """Raise a clear TypeError unless targets is an integer tensor (their range is checked on the device)."""
    if targets.dtype.is_floating_point or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")


def count_valid_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """How many targets are not ignore_index, as a 0-d tensor left on the device.

    There is deliberately no range check here: reading its result would be a host sync on every loss call, which
    stalls the queue of a training step. The loss kernels instead turn an out-of-range target into a NaN loss and
    gradient, and the trainer checks every token id against the vocabulary once, when it opens a token file.
    """
    return (targets != ignore_index).sum()


def check_doc_ids(doc_ids: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    """Raise a clear error unless doc_ids are (B, S) integers beside k (B, Hkv, S, d), for causal attention."""
    if not causal:
        raise ValueError("doc_ids mask attention across documents for causal attention only (causal=True)")
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex:
        raise TypeError(f"doc_ids must be an integer tensor, got {getattr(doc_ids, 'dtype', type(doc_ids))}")
    if doc_ids.dtype == torch.bool or doc_ids.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"doc_ids must be (B, S) = {(k.shape[0], k.shape[2])} integers, got "
                         f"{tuple(doc_ids.shape)} {doc_ids.dtype}")
    check_same_device(k=k, doc_ids=doc_ids)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) int32: the first position of each position's document, a document being a run of equal consecutive
    ids (so the ids need no particular order, and nothing is read back to the host). E.g. [7, 7, 3, 3, 3, 7] ->
    [0, 0, 2, 2, 2, 5]."""
    positions = torch.arange(doc_ids.shape[1], dtype=torch.int32, device=doc_ids.device)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(new, positions, 0).cummax(dim=1).values


def document_ends(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) int32: one past the last position of each position's document ([7, 7, 3, 3, 3, 7] -> [2, 2, 5, 5, 5, 6]):
    the starts of the reversed rows, mirrored."""
    return doc_ids.shape[1] - document_starts(doc_ids.flip(1)).flip(1)
