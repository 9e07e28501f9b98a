"""Lower Triton kernels for an NVIDIA GPU (sm_75 to sm_90a) through Triton's real JIT launch path, with no GPU, and
read the result.

Why: what decides a kernel's speed on a card is mostly visible in the code ptxas emits (tensor-core instructions or
FMA, spills, shared memory, vector widths of global accesses, the grid), and that code depends on how a launch
specializes the arguments: pointers and ints divisible by 16 get `tt.divisibility = 16`, ints equal to 1 become
constants, so a `stride == 1` axis turns into contiguous vector loads. Hand-typed signatures (every int `i32`) miss
all of that and give different code. Here the kernel is launched normally, `kernel[grid](tensors..., ints...)` or
through its op's own launcher, while a stand-in driver is active:

- the target is GPUTarget("cuda", capability, 32) of one of DEVICES (T4 sm_75, A100 sm_80, RTX 3090 sm_86, L4
  sm_89, H100 sm_90a: Triton's NVIDIA backend lowers capability 90 for `sm_90a`, with wgmma, TMA and setmaxnreg),
  and the driver reports that card's shared memory per block, registers and SM count, exactly as on the card;
- the binder specializes the real arguments with Triton's own code (`native_specialize_impl`), so the signature,
  divisibility and constants are a real launch's;
- the launcher compiles (Triton IR -> PTX -> ptxas cubin) and records the grid, but never launches anything;
- an autotuner's benchmark runs each config its pruner keeps once (compile + record) and times nothing, so every
  kept config is compiled; the first kept config is then "chosen".

Tensors: CPU tensors stand in for CUDA ones. The binder only reads `data_ptr()` (aligned to 16 or not) and the
dtype; torch's CPU allocator aligns every allocation to 64 bytes and the CUDA caching allocator to 512, so both are
divisible by 16 and a view at an offset gives the same residue on either, hence the same specialization. `torch.empty`
reserves but does not touch memory, so preset-sized buffers cost nothing. Launchers that branch on
`device.type == "cuda"` (e.g. to size a persistent grid from the SM count) take their CPU branch: read such grids
with that in mind.

API (stable; used by bench/lowering.py and the static gates in tests/):

    from smollm_stack.kernels.tooling import lowering
    with lowering.compile_only(lowering.DEVICES["sm_80"]) as launches:  # default: the H100; the real driver back
                                                                         # on exit
        my_kernel[grid](x, y, n, BLOCK=1024)    # or any launcher: flash_attention(q, k, v), rms_norm(x, w), ...
    for launch in launches:                     # one Launch per distinct compiled kernel x grid, in launch order
        launch.name, launch.config, launch.grid, launch.stats.wgmma, launch.stats.vector_share("ld"), ...
    print(lowering.table(launches))             # one line per launch; lowering.HEADER names the columns
    json.dumps([lowering.record(launch) for launch in launches])   # flat dicts, e.g. to pass out of a subprocess

Launch: name, config (constexprs, the ints the launch turned into constants such as a stride of 1, num_warps and
num_stages), grid, stats (Stats), ctas (grid size),
resident_ctas / resident_warps (per SM, from registers, shared memory and the SM's limits), waves (grid / (SMs x
resident CTAs)). Stats: regs, spill_stores / spill_loads (STL / LDL instructions in the SASS: register spills to
local memory), local (the STL + LDL of local arrays the PTX itself declares, such as libdevice sinf's, counted here
instead when ptxas reports no spill for the kernel), stack (stack frame bytes per thread), shared (bytes), wgmma /
mma_sync (PTX tensor-core instructions), wgmma_n (the wgmma by their N: m64nNk16 -> {N: count}), dots /
tensor_core_dots (the tl.dots of the TTGIR, and those of them whose result has a tensor-core layout: a dot the backend
could not put on tensor cores runs as FMA), cp_async / tma
(PTX cp.async and cp.async.bulk), loads / stores (PTX ld.global / st.global counts by access width in bytes, of the
kernel's tensors), table_loads (the loads of constant arrays compiled into the module, such as libdevice sinf's 2/pi
table, apart), vector_share(kind) (the share of the tensors' bytes moved by 16-byte vectors).
A config the pruner kept but that cannot launch (too much shared memory) is a Launch with `error` set.

ptxas_version() names the ptxas used. Must run with TRITON_INTERPRET unset (the interpreter replaces the JIT);
tests do it in subprocesses through the `compile_for_gpu` fixture (tests/conftest.py).
"""

import contextlib
import dataclasses
import gc
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

__all__ = ["DEVICES", "H100", "HEADER", "Launch", "Stats", "compile_only", "ptxas_version", "record", "table"]


@dataclasses.dataclass(frozen=True)
class Device:
    """What limits residency on one SM, and how many SMs there are."""

    name: str
    capability: int
    sms: int
    regs_per_sm: int = 64 * 1024
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024  # the driver keeps 1 KB of each block's shared memory
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32


    @property
    def target(self) -> str:
        """The ptxas target name: sm_90a on Hopper (Triton lowers capability 90 with its "a" features), sm_XY below."""
        return f"sm_{self.capability}" + ("a" if self.capability == 90 else "")


H100 = Device("H100 SXM", capability=90, sms=132)
# Each architecture's card our users have, with its limits from NVIDIA's tuning guides (shared memory a block may opt
# into, per SM, warps and CTAs an SM holds); registers are 64K an SM and 255 a thread on all of them.
DEVICES = {
    "sm_75": Device("T4", capability=75, sms=40, smem_per_sm=64 * 1024, smem_per_block=64 * 1024,
                    max_warps_per_sm=32, max_ctas_per_sm=16),
    "sm_80": Device("A100", capability=80, sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_86": Device("RTX 3090", capability=86, sms=82, smem_per_sm=100 * 1024, smem_per_block=99 * 1024,
                    max_warps_per_sm=48, max_ctas_per_sm=16),
    "sm_89": Device("L4", capability=89, sms=58, smem_per_sm=100 * 1024, smem_per_block=99 * 1024,
                    max_warps_per_sm=48, max_ctas_per_sm=24),
    "sm_90a": H100,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Stats:
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int
    local: int  # STL + LDL of the PTX's own local arrays, not spills
    shared: int
    wgmma: int
    wgmma_n: dict  # N of wgmma.mma_async m64nNk16 -> count: Hopper runs narrow N (32) far below its peak
    mma_sync: int
    dots: int
    tensor_core_dots: int
    cp_async: int
    tma: int
    loads: dict  # access width in bytes -> count of ld.global in the PTX, of the kernel's tensors
    stores: dict  # same for st.global
    table_loads: dict  # same for the ld.global of constant arrays compiled into the module (libdevice's), not tensors

    def vector_share(self, kind: str) -> float:
        """Share of the bytes that global loads ("ld") or stores ("st") of the kernel's tensors move in 16-byte
        accesses, counting each instruction of the PTX once (a loop body once): 1.0 when a kernel moves its data in
        full vectors and only per-row scalars (a row's statistic, a target's logit) go narrower; 1.0 when there are
        none. Table loads are left out: they read a few bytes of the binary's own constants, not the data."""
        counts = self.loads if kind == "ld" else self.stores
        total = sum(int(width) * n for width, n in counts.items())
        return 16 * counts.get(16, 0) / total if total else 1.0


@dataclasses.dataclass
class Launch:
    name: str
    config: dict
    grid: tuple
    stats: Stats | None
    device: Device = H100
    error: str | None = None

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def resident_ctas(self) -> int:
        """CTAs per SM that registers, shared memory, warps and the CTA cap all allow."""
        dev, warps = self.device, self.config["num_warps"]
        regs_per_warp = -(-max(self.stats.regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = dev.regs_per_sm // (regs_per_warp * warps)
        smem = self.stats.shared + dev.smem_reserved_per_block
        by_smem = dev.smem_per_sm // smem
        return min(by_regs, by_smem, dev.max_warps_per_sm // warps, dev.max_ctas_per_sm)

    @property
    def resident_warps(self) -> int:
        return self.resident_ctas * self.config["num_warps"]

    @property
    def waves(self) -> float:
        return self.ctas / (self.device.sms * max(self.resident_ctas, 1))


# Reading the compiled code -------------------------------------------------------------------------------------------

_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_WIDTH = re.compile(r"\.(?:b|u|s|f)(\d+)$")
_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);", re.M)
_OPERAND = re.compile(r"\s*(?:\{[^}]*\}|\[[^\]]*\]|[^,]+)")
_NAME = re.compile(r"%?[A-Za-z_$][\w$]*")
_MODULE_ARRAY = re.compile(r"^\.(?:global|const)\s+(?:\.\w+\s+(?:\d+\s+)?)*([A-Za-z_$][\w$]*)\[\d*\]\s*=", re.M)
_LOCAL_ARRAY = re.compile(r"^\s*\.local\s", re.M)
_ADDRESS_OPS = {"mov", "add", "sub", "cvta", "selp", "mad"}  # what carries a base address into a register
_WGMMA_N = re.compile(r"\bwgmma\.mma_async[\w.]*?\.m64n(\d+)k\d+")


def _width(suffixes: str) -> int | None:
    """Bytes per access from an ld/st's suffixes: .v4.b32 -> 16, .v2.b32 -> 8, .b16 -> 2, ..."""
    parts = suffixes.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(m.group(1)) for p in parts if (m := _WIDTH.match("." + p))), None)
    return None if bits is None else lanes * bits // 8


def _address_bases(instructions: list, tables: set) -> dict:
    """register -> where the addresses it may hold start: a module array's name, "param" or "memory".

    Followed through the instructions that move or offset a base address (mov, add, sub, cvta, selp, mad), to a
    fixpoint, since a loop's registers are reassigned below their first use. Any other instruction (a multiply, a
    shift, a conversion) makes an offset, not a base."""
    bases: dict[str, set] = {}
    changed = True
    while changed:
        changed = False
        for op, operands in instructions:
            if not operands or operands[0].startswith("["):
                continue  # a store, a branch: defines no register
            if op.startswith("ld.param"):
                new = {"param"}
            elif op.startswith("ld."):
                new = {"memory"}
            elif op.split(".")[0] in _ADDRESS_OPS:
                names = [n for o in operands[1:] for n in _NAME.findall(o)]
                new = {n for n in names if n in tables} | set().union(*(bases.get(n, ()) for n in names))
            else:
                continue
            for reg in _NAME.findall(operands[0]):
                if not new <= bases.setdefault(reg, set()):
                    bases[reg] |= new
                    changed = True
    return bases


def _access_widths(ptx: str) -> tuple[Counter, Counter, Counter]:
    """(loads, stores, table loads): ld.global / st.global counts by bytes per access, the loads of the module's own
    constant arrays apart.

    A module array is data compiled into the binary: libdevice's sinf/cosf keep the 2/pi bits of their large-argument
    (Payne-Hanek) reduction in one (__cudart_i2opi_f, 24 bytes) and read it with scalar loads, on a path taken only
    for |x| > 105615. A load counts as a table load only if every base its address can start from is a module array:
    tensors reach a kernel only through its parameters, so such a load never reads a tensor. An address that may
    also start from a parameter, from a value loaded from memory or from nowhere known stays the kernel's, so this
    can only leave a table load among the kernel's (and fail a gate), never hide a tensor load."""
    tables = set(_MODULE_ARRAY.findall(ptx))
    instructions = [(op, [o.strip() for o in _OPERAND.findall(rest)]) for op, rest in _INSTRUCTION.findall(ptx)]
    bases = _address_bases(instructions, tables) if tables else {}
    widths = {"ld": Counter(), "st": Counter(), "table": Counter()}
    for op, operands in instructions:
        access = _GLOBAL_ACCESS.match(op)
        if not access or (width := _width(access.group(2))) is None:
            continue
        address = next(o for o in operands if o.startswith("["))
        starts = set().union(*({n} if n in tables else bases.get(n, {"unknown"}) for n in _NAME.findall(address)))
        kind = "table" if access.group(1) == "ld" and starts and starts <= tables else access.group(1)
        widths[kind][width] += 1
    return widths["ld"], widths["st"], widths["table"]


def _tool(name: str) -> str:
    return getattr(knobs.nvidia, name).path


def _ptxas(capability: int):
    """The ptxas Triton compiles for this capability with: Triton 3.9 takes its newer one (13.x) from sm_90 on."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability)


def ptxas_version(device: Device = H100) -> str:
    """The version of the ptxas Triton compiles for `device` with, e.g. "13.4"."""
    return _ptxas(device.capability).version


def _sass_stats(name: str, cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, STL count, LDL count) of the cubin, from cuobjdump.

    STL/LDL address local memory, which a kernel has only with a stack frame or local bytes in its resource usage;
    without either there is none to count, and the disassembly, the slow part, is skipped.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        regs, stack, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout).groups())
        if not stack and not local:
            return regs, stack, 0, 0
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    return regs, stack, len(re.findall(r"\bSTL\b", sass.stdout)), len(re.findall(r"\bLDL\b", sass.stdout))


def _ptxas_spills(ptx: str, device: Device) -> bool:
    """Whether ptxas -v, run on the PTX as Triton runs it, reports spill stores or loads."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(device.capability).path, "-v", f"--gpu-name={device.target}", src, "-o", out],
                             capture_output=True, text=True, check=True)  # fmt: skip
    return any(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.stdout + log.stderr))


_TENSOR_CORE_LAYOUT = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<", re.M)
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^>]*?(#\w+)>")


def _dots(ttgir: str) -> tuple[int, int]:
    """(dots, those on tensor cores) of a kernel's TTGIR: a wgmma dot always, a tt.dot when its result is laid out for
    mma (#ttg.nvidia_mma); a dot lowered as FMA keeps a blocked layout."""
    mma = set(_TENSOR_CORE_LAYOUT.findall(ttgir))
    dots = _DOT.findall(ttgir)
    return len(dots), sum(op == "ttng.warp_group_dot" or layout in mma for op, layout in dots)


def _stats(name: str, cubin: bytes, ptx: str, ttgir: str, shared: int, device: Device) -> Stats:
    regs, stack, stl, ldl = _sass_stats(name, cubin)
    # STL/LDL are spills, unless the PTX declares local arrays (libdevice sinf/cosf keep their Payne-Hanek digits in
    # one) and ptxas, asked again with -v (only then: it costs a compile), counts no spill: then they are the array's.
    local = 0
    if (stl or ldl) and _LOCAL_ARRAY.search(ptx) and not _ptxas_spills(ptx, device):
        local, stl, ldl = stl + ldl, 0, 0
    loads, stores, table_loads = _access_widths(ptx)
    dots, tensor_core_dots = _dots(ttgir)
    return Stats(
        regs=regs, stack=stack, spill_stores=stl, spill_loads=ldl, local=local, shared=shared,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), wgmma_n=dict(Counter(map(int, _WGMMA_N.findall(ptx)))),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        dots=dots, tensor_core_dots=tensor_core_dots,
        cp_async=len(re.findall(r"\bcp\.async\.(?!bulk)", ptx)), tma=len(re.findall(r"\bcp\.async\.bulk", ptx)),
        loads=dict(loads), stores=dict(stores), table_loads=dict(table_loads),
    )


# The stand-in driver -------------------------------------------------------------------------------------------------


class _Handle:
    """What load_binary returns as the 'function': the compiled kernel's statistics."""

    def __init__(self, stats: Stats):
        self.stats = stats


class _Utils:
    def __init__(self, device: Device, code_by_name: dict):
        self.device, self.code_by_name = device, code_by_name

    def get_device_properties(self, _device):
        dev = self.device
        return {"max_shared_mem": dev.smem_per_block, "multiprocessor_count": dev.sms, "max_num_regs": dev.regs_per_sm,
                "warpSize": 32, "sm_clock_rate": 1_980_000, "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}

    def load_binary(self, name, cubin, shared, _device):
        ptx, ttgir = self.code_by_name.pop(name, ("", ""))
        stats = _stats(name, cubin, ptx, ttgir, shared, self.device)
        return None, _Handle(stats), stats.regs, stats.stack // 4, 1024

    def unload_module(self, _module):
        pass


class _Driver(DriverBase):
    """Reports the device's target; its launcher records launches instead of running them."""

    def __init__(self, device: Device, launches: list):
        super().__init__()
        self.device, self.launches, self.code_by_name = device, launches, {}
        self.utils = _Utils(device, self.code_by_name)
        self.launcher_cls = self._launcher

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.device.capability, 32)

    def get_current_device(self):
        return f"compile-only:{self.device.name}"  # its own JIT cache key, never shared with a real device

    def set_current_device(self, _device):
        pass

    def get_current_stream(self, _device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cpu

    def get_benchmarker(self):
        return self._bench_once

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, _cache):
        pass

    def _bench_once(self, kernel_call, quantiles=None, **_):
        """The autotuner's benchmark: compile and record the config once, time nothing."""
        try:
            kernel_call()
        except triton.runtime.errors.OutOfResources as e:
            # the autotuner's kernel_call closes over its tuner (self) and the config's kwargs (current)
            cells = _closure(kernel_call)
            tuner = cells.get("self")
            name = tuner.base_fn.__name__ if hasattr(tuner, "base_fn") else "?"
            self.launches.append(Launch(name, dict(cells.get("current", {})), (0, 0, 0), None, self.device,
                                        error=str(e)))
            raise
        return [0.0, 0.0, 0.0]

    def _launcher(self, src, metadata):
        config = {k if isinstance(k, str) else src.fn.arg_names[k[0]]: v for k, v in src.constants.items()}
        config = {**config, "num_warps": metadata.num_warps, "num_stages": metadata.num_stages}
        launches, device = self.launches, self.device

        def launch(grid_x, grid_y, grid_z, _stream, function, *_):
            new = Launch(metadata.name, config, (grid_x, grid_y, grid_z), function.stats, device)
            if not any(old.name == new.name and old.config == new.config and old.grid == new.grid for old in launches):
                launches.append(new)

        return launch


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _forget_tuning() -> None:
    """Drop every autotuner's choices: they are kept per key and dtype, not per device, so a choice made for another
    card would stand in for the pruning and compiling of this one's configs."""
    for obj in gc.get_objects():
        if issubclass(type(obj), triton.runtime.Autotuner):  # type(): isinstance would wake lazy proxies
            obj.cache.clear()


@contextlib.contextmanager
def compile_only(device: Device = H100):
    """Inside, Triton launches compile for `device` and are recorded in the yielded list instead of running; every
    autotuner tunes afresh (and compiles each config its pruner keeps for the device)."""
    _forget_tuning()
    launches: list[Launch] = []
    stand_in = _Driver(device, launches)
    previous, hook = driver._active, knobs.runtime.kernel_load_start_hook

    def keep_code(_module, _function, name, metadata_group, _hash):
        def text(suffix: str) -> str:
            path = next((p for c, p in metadata_group.items() if c.endswith(suffix)), None)
            return open(path).read() if path else ""

        stand_in.code_by_name[name] = text(".ptx"), text(".ttgir")

    driver.set_active(stand_in)
    knobs.runtime.kernel_load_start_hook = keep_code
    try:
        yield launches
    finally:
        driver._active, knobs.runtime.kernel_load_start_hook = previous, hook


# The report ----------------------------------------------------------------------------------------------------------

HEADER = (f"{'kernel':<24} {'config':<40} {'regs':>4} {'spill':>5} {'smem KB':>7} {'TC dots':>7} {'wgmma':>5} "
          f"{'mma':>4} {'cp.as':>5} {'tma':>3} {'ld16':>5} {'st16':>5} {'grid':>8} {'CTA/SM':>6} {'warp/SM':>7} "
          f"{'waves':>6}")


def _config_text(config: dict) -> str:
    blocks = [f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.items() if k.startswith("BLOCK")]
    flags = [k for k, v in config.items() if k.isupper() and v is True]  # e.g. CAUSAL, INVERSE, WRITE_GRAD
    return " ".join([*blocks, *flags, f"w{config.get('num_warps', '?')}", f"s{config.get('num_stages', '?')}"])


def row(launch: Launch) -> str:
    if launch.error:
        return f"{launch.name:<24} {_config_text(launch.config):<40} cannot launch: {launch.error.splitlines()[0]}"
    s = launch.stats
    return (f"{launch.name:<24} {_config_text(launch.config):<40} {s.regs:>4} {s.spill_stores + s.spill_loads:>5} "
            f"{s.shared / 1024:>7.1f} {f'{s.tensor_core_dots}/{s.dots}':>7} {s.wgmma:>5} {s.mma_sync:>4} "
            f"{s.cp_async:>5} {s.tma:>3} "
            f"{s.vector_share('ld'):>5.0%} {s.vector_share('st'):>5.0%} {launch.ctas:>8} {launch.resident_ctas:>6} "
            f"{launch.resident_warps:>7} {launch.waves:>6.2f}")


def table(launches: list[Launch]) -> str:
    return "\n".join([HEADER, *map(row, launches)])


def record(launch: Launch) -> dict:
    """A launch as a flat JSON-friendly dict: name, config, grid, error, every Stats field, the derived numbers."""
    out = {"name": launch.name, "config": launch.config, "grid": list(launch.grid), "error": launch.error}
    if launch.stats:
        out.update(dataclasses.asdict(launch.stats), ld16=launch.stats.vector_share("ld"),
                   st16=launch.stats.vector_share("st"), ctas=launch.ctas, resident_ctas=launch.resident_ctas,
                   resident_warps=launch.resident_warps, waves=launch.waves)
    return out
