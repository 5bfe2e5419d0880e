"""A batch-invariant linear for the few rows of a decode or verify step, on x86 CPUs with AVX2.

Speculative decoding pays when checking k+1 tokens costs about one decode step. On a CPU,
BLAS turns a one-row GEMV (memory-bound) into a packed GEMM for two rows or more and goes
compute-bound: on one thread of a 2-core CPU a 6-token SmolLM2 forward cost 1.84x a 1-token one.
small_gemm.c streams each weight matrix once for up to 8 rows, so a verify step costs
about a decode step, and it reduces every output in the same order whatever the number
of rows: a block verified at once gives the same bits as its tokens decoded one by one.

Layers of a model loaded from GGUF can also carry their weight in its Q4_1 or Q8_0 blocks
(specdec/compute/gguf_blocks.py); the kernel then rebuilds the exact fp32 weights in registers and a
decode step reads a fifth of the bytes, with the same output bits.

The kernel is compiled on first use with the system C compiler into the cache directory, with
AVX-512 where the CPU has it: 32 registers, and 16-lane accumulators, so an FMA does twice an
AVX2 one's work (an 8-session SmolLM2 decode step 24 ms -> 17 ms, python -m bench.step_cost).
Each build is batch-invariant on its own; the AVX-512 build's bits differ from the AVX2 build's
by rounding. Images build an AVX2 one ahead and name it in SPECD_SMALL_GEMM_LIB. Without a compiler, AVX2 or
FMA, layers use torch's linear; services turn it off with the small_gemm setting.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from specdec.config import runtime_settings
from specdec.file_cache import CACHE_DIR

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_gemm.c")
# The library's translation units (the thread pool, the fp32 and GGUF-block linears and attention, the
# 8-bit-activation linears of quant_gemm.c) and the header they share.
SOURCES = (SOURCE, SOURCE.with_name("kernel_pool.c"), SOURCE.with_name("quant_gemm.c"))
HEADERS = (SOURCE.with_name("kernel_pool.h"),)
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")  # no fused d*q+m: gguf-py rounds twice
AVX512_FLAGS = ("-mavx512f", "-mavx512vl", "-mavx512dq")  # added where the CPU has them: 16-lane accumulators
# A verifier step packs the rows of many sessions and prompt chunks: the kernel keeps each row's bits
# independent of the others up to here (the verifier's max_step_rows is at most this); larger inputs go
# to BLAS. Past about 64 rows both run at the same speed on a 2-core CPU (python -m bench.verify_cost).
MAX_ROWS = 256
BLOCK_KERNELS = ("q4_1_gemm", "q8_0_gemm")


def _cpu_flags() -> set[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split(":", 1)[-1].split())


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= _cpu_flags()


def compile_flags() -> tuple[str, ...]:
    """The flags this CPU's build takes: AVX-512 where every instruction it adds runs here."""
    wide = {"avx512f", "avx512vl", "avx512dq"} <= _cpu_flags()
    return COMPILE_FLAGS + (AVX512_FLAGS if wide else ())


ABI_VERSION = 3  # small_gemm_abi_version() of the functions below: a library of another is not loaded


class QuantPlanes(ctypes.Structure):
    """quant_gemm.c's quant_weight: a weight's format and the pointers to its repacked planes."""

    _fields_ = [("format", ctypes.c_int32), ("codes", ctypes.c_void_p), ("high", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p), ("d", ctypes.c_void_p),
                ("dmin", ctypes.c_void_p)]


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source version; None where it cannot run here."""
    if not _cpu_has_avx2_fma():
        return None
    prebuilt = runtime_settings().small_gemm_lib
    kernel = _open(Path(prebuilt)) if prebuilt else None
    if prebuilt and kernel is None:
        log.warning("%s is not a kernel library of calling convention %d: building the kernel from source",
                    prebuilt, ABI_VERSION)
    if kernel is None:
        library = _build()
        kernel = _open(library) if library is not None else None
    if kernel is None:
        return None
    kernel.small_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    kernel.small_gemm.restype = None
    for name in BLOCK_KERNELS:
        getattr(kernel, name).argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
        getattr(kernel, name).restype = None
    kernel.small_gemm_set_threads.argtypes = [ctypes.c_int]
    kernel.small_gemm_set_threads.restype = ctypes.c_int
    kernel.paged_attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float]
    kernel.paged_attention.restype = ctypes.c_int
    planes = ctypes.POINTER(QuantPlanes)
    kernel.quant_repack.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, planes]
    kernel.quant_repack.restype = ctypes.c_int
    kernel.quant_dequantize.argtypes = [planes, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    kernel.quant_dequantize.restype = None
    kernel.quant_gemm.argtypes = [planes] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    kernel.quant_gemm.restype = ctypes.c_int
    kernel.quant_gemm_portable_range.argtypes = [planes] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    kernel.quant_gemm_portable_range.restype = None
    kernel.quant_gemm_vectorised.restype = ctypes.c_int
    return kernel


def _open(library: Path) -> ctypes.CDLL | None:
    """The library at `library` if it loads and speaks this module's calling convention."""
    try:
        kernel = ctypes.CDLL(str(library))
        kernel.small_gemm_abi_version.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return kernel if kernel.small_gemm_abi_version() == ABI_VERSION else None


def set_threads(threads: int) -> int:
    """Splits each layer's outputs among `threads` threads (the same bits); returns how many it uses."""
    kernel = load_kernel()
    return kernel.small_gemm_set_threads(threads) if kernel is not None else 1


def kernel_available() -> bool:
    return load_kernel() is not None


ATTENTION_ERRORS = {1: "a head count or size out of range", 2: "a row's length or blocks outside its block table",
                    3: "a block table entry outside the KV store"}


def paged_attention(query: torch.Tensor, key_store: torch.Tensor, value_store: torch.Tensor, block_table: torch.Tensor,
                    row_blocks: torch.Tensor, row_len: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Each row's attention over its own session's paged KV (fp32, CPU; see small_gemm.c).

    query [N, H, D] contiguous; key_store/value_store [slots, Hkv, D]; block_table int32 [total blocks];
    row_blocks int64 [N] (where the row's session starts in block_table); row_len int32 [N] (positions
    it attends to, its own included) -> [N, H, D]. Raises ValueError, having read nothing, for inputs the
    kernel would read out of range with.
    """
    check_attention_inputs(query, key_store, value_store, block_table, row_blocks, row_len)
    rows, heads, head_dim = query.shape
    out = torch.empty_like(query)
    status = load_kernel().paged_attention(
        query.data_ptr(), out.data_ptr(), key_store.data_ptr(), value_store.data_ptr(), block_table.data_ptr(),
        row_blocks.data_ptr(), row_len.data_ptr(), rows, heads, key_store.shape[1], head_dim, block_size,
        key_store.shape[0], block_table.shape[0], scale)
    if status:
        raise ValueError(f"paged attention refused its inputs: {ATTENTION_ERRORS[status]}")
    return out


def check_attention_inputs(query: torch.Tensor, key_store: torch.Tensor, value_store: torch.Tensor,
                           block_table: torch.Tensor, row_blocks: torch.Tensor, row_len: torch.Tensor) -> None:
    """paged_attention's checks of shapes, dtypes and layout (the C side checks the indices they hold)."""
    _check_tensor("query", query, torch.float32, 3)
    rows, _, head_dim = query.shape
    for name, store in (("key_store", key_store), ("value_store", value_store)):
        _check_tensor(name, store, torch.float32, 3)
        if store.shape[2] != head_dim or store.shape != key_store.shape:
            raise ValueError(f"{name} {tuple(store.shape)} does not match query {tuple(query.shape)}")
    _check_tensor("block_table", block_table, torch.int32, 1)
    for name, index, dtype in (("row_blocks", row_blocks, torch.int64), ("row_len", row_len, torch.int32)):
        _check_tensor(name, index, dtype, 1)
        if index.shape[0] != rows:
            raise ValueError(f"{name} has {index.shape[0]} entries for {rows} rows")


def _check_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype, dims: int) -> None:
    if tensor.dtype != dtype or tensor.dim() != dims or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dims}-d {dtype} CPU tensor, not {tensor.dtype} "
                         f"{tuple(tensor.shape)} on {tensor.device}" + ("" if tensor.is_contiguous() else ", strided"))


def _build() -> Path | None:
    """Compiles the kernel once per source version into the cache directory."""
    compiler = shutil.which(runtime_settings().compiler) or shutil.which("gcc")
    flags = compile_flags()
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES + HEADERS) + " ".join(flags).encode())
    digest = digest.hexdigest()[:16]
    library = CACHE_DIR / "kernels" / f"small_gemm-{digest}.so"
    if not library.exists():
        if compiler is None:
            log.warning("no C compiler found: decode and verify steps use torch's linear")
            return None
        library.parent.mkdir(parents=True, exist_ok=True)
        staging = library.with_name(library.name + f".tmp{os.getpid()}")
        result = subprocess.run([compiler, *flags, "-o", str(staging), *map(str, SOURCES)], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("compiling the kernel failed, using torch's linear: %s", result.stderr.strip()[-500:])
            return None
        staging.rename(library)  # atomic: concurrent services never load a half-written file
    return library


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           blocks: BlockWeight | None = None) -> torch.Tensor:
    """F.linear, through the kernel for up to MAX_ROWS rows of fp32 CPU inference.

    x [..., K], weight [N, K] (contiguous), bias [N] or None -> [..., N]. `blocks`, when given,
    holds the same weight in GGUF blocks (blocks.dequantize() equals weight bit for bit).
    """
    in_features = weight.shape[-1]
    if x.shape[-1] != in_features:
        raise ValueError(f"input features {x.shape[-1]} do not match the weight's {tuple(weight.shape)}")
    rows = x.numel() // in_features if in_features else 0
    kernel = load_kernel()
    if (kernel is None or not 0 < rows <= MAX_ROWS or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                      or bias.shape != weight.shape[:1]))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, in_features).contiguous()  # [rows, K]
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)  # [rows, N]
    bias_ptr = None if bias is None else bias.data_ptr()
    if blocks is None or not blocks.still_matches(weight):
        kernel.small_gemm(flat.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(), rows, weight.shape[0], in_features)
    else:
        if blocks.codes.shape[:2] != (weight.shape[0], in_features // BLOCK_SIZE):
            raise ValueError(f"blocks {tuple(blocks.codes.shape)} do not hold the weight {tuple(weight.shape)}")
        gemm = kernel.q4_1_gemm if blocks.kind == "q4_1" else kernel.q8_0_gemm
        minimum = None if blocks.minimum is None else blocks.minimum.data_ptr()
        gemm(flat.data_ptr(), blocks.codes.data_ptr(), blocks.scale.data_ptr(), minimum, bias_ptr, out.data_ptr(),
             rows, weight.shape[0], in_features)
    return out.reshape(*x.shape[:-1], weight.shape[0])


BLOCK_SIZE = 32
CODE_BYTES = {"q4_1": BLOCK_SIZE // 2, "q8_0": BLOCK_SIZE}


@dataclass(frozen=True)
class BlockWeight:
    """A [N, K] weight in GGUF blocks of 32 along K: w = scale * code (+ minimum for Q4_1).

    Q4_1 codes hold weights 0-15 of a block in the low nibbles of its 16 bytes and 16-31 in the
    high ones; Q8_0 codes are int8. Scales and minimums are stored as fp32 (exact from fp16).
    """

    kind: str                      # "q4_1" or "q8_0"
    codes: torch.Tensor            # uint8 [N, K / 32, CODE_BYTES[kind]]
    scale: torch.Tensor            # fp32 [N, K / 32]
    minimum: torch.Tensor | None   # fp32 [N, K / 32] for Q4_1, else None
    weight_version: int | None = None  # the weight's in-place version when checked equal; None: not tracked

    def __post_init__(self):
        """The kernel reads codes, scales and minimums by the codes' shape: each must hold what it says."""
        if self.kind not in CODE_BYTES:
            raise ValueError(f"unknown block kind {self.kind!r}")
        _check_tensor("codes", self.codes, torch.uint8, 3)
        if self.codes.shape[2] != CODE_BYTES[self.kind]:
            raise ValueError(f"{self.kind} codes hold {CODE_BYTES[self.kind]} bytes a block, not {self.codes.shape[2]}")
        for name, values in (("scale", self.scale), ("minimum", self.minimum)):
            if name == "minimum" and self.kind != "q4_1":
                continue
            _check_tensor(name, values, torch.float32, 2)
            if values.shape != self.codes.shape[:2]:
                raise ValueError(f"{name} {tuple(values.shape)} does not match codes {tuple(self.codes.shape)}")

    def still_matches(self, weight: torch.Tensor) -> bool:
        """False once the weight was changed in place (an optimizer step, load_state_dict) since the check."""
        return self.weight_version is None or weight._version == self.weight_version

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K], rounded as gguf-py rounds it."""
        if self.kind == "q4_1":
            codes = torch.cat([self.codes & 0x0F, self.codes >> 4], dim=-1).float()  # [N, K / 32, 32]
            weight = self.scale.unsqueeze(-1) * codes + self.minimum.unsqueeze(-1)
        else:
            weight = self.codes.view(torch.int8).float() * self.scale.unsqueeze(-1)
        return weight.reshape(self.codes.shape[0], -1)


class SmallBatchLinear(torch.nn.Linear):
    """nn.Linear whose small inference inputs go through the kernel; same parameters and state dict."""

    blocks: BlockWeight | None = None  # set by gguf_blocks.attach where the weight came from GGUF blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.blocks)


class SmallBatchConv1D(Conv1D):
    """transformers' Conv1D (weight [K, N], GPT-2's projections) through the kernel, which reads [N, K]:
    the transposed copy is made once and again only after the weight changes in place."""

    _transposed: tuple[int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._transposed is None or self._transposed[0] != self.weight._version:
            self._transposed = (self.weight._version, self.weight.detach().t().contiguous())
        return linear(x, self._transposed[1], self.bias)


def install(model: torch.nn.Module) -> int:
    """Routes `model`'s linear layers, Conv1D projections and subset LM head through the kernel; returns
    how many are. 0 where the kernel cannot run here."""
    from specdec.compute.subset_head import SubsetLMHead

    if load_kernel() is None:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) in (torch.nn.Linear, SmallBatchLinear):  # a second install counts the same layers
            module.__class__ = SmallBatchLinear  # in place: parameters, hooks and ties stay as they are
            swapped += 1
        elif type(module) in (Conv1D, SmallBatchConv1D):
            module.__class__ = SmallBatchConv1D
            swapped += 1
        elif isinstance(module, SubsetLMHead):
            module.project = linear
            swapped += 1
    return swapped
