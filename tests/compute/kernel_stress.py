"""A stress of the kernel library's thread pool, run under a sanitizer by tests/compute/test_kernel_sanitizers.py.

python tests/compute/kernel_stress.py LIBRARY ROUNDS: loads LIBRARY with ctypes (no torch, so the only
instrumented code is the kernel's), computes every job once on the caller's thread alone, then runs
them all again from two Python threads at once with the pool split over two threads, in a shuffled
order each round, and exits non-zero if any output differs by a bit from its single-thread one, or if
attention inputs that index outside their block table or store are not refused.
The jobs mix every kernel kind (quant_gemm.c's formats among them), row counts from 1 to past a pass of 8, widths that do and do not
fill a chunk, and attention lengths of 1, at a block's boundary and long.
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading

import numpy as np

BLOCK_SIZE = 16  # KV slots per block
CODE_BYTES = {"q4_1": 16, "q8_0": 32}
# quant_gemm.c's formats: their number, (weights, bytes) of a GGUF block, the offsets of its fp16 scales.
QUANT_FORMATS = {"q4_k": (1, (256, 144), (0, 2)), "q6_k": (2, (256, 210), (208,)), "q5_0": (3, (32, 22), (0,)),
                 "q8_0_int": (4, (32, 34), (0,))}


class QuantPlanes(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int32)] + [(name, ctypes.c_void_p)
                                               for name in ("codes", "high", "scales", "mins", "d", "dmin")]


def pointer(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


class Job:
    """One kernel call with its inputs; run() returns a fresh output."""

    def __init__(self, kernel: ctypes.CDLL, kind: str, rng: np.random.Generator):
        self.kernel, self.kind = kernel, kind
        if kind == "attention":
            self._attention_inputs(rng)
            return
        if kind in QUANT_FORMATS:
            self._quant_inputs(rng)
            return
        self.rows = int(rng.choice([1, 2, 3, 5, 8, 9, 17, 40]))
        self.n_out = int(rng.choice([1, 37, 128, 200, 513]))
        self.k_in = int(rng.choice([32, 64, 96])) if kind != "fp32" else int(rng.choice([8, 37, 64, 96]))
        self.x = rng.standard_normal((self.rows, self.k_in), dtype=np.float32)
        self.bias = rng.standard_normal(self.n_out, dtype=np.float32) if rng.random() < 0.5 else None
        if kind == "fp32":
            self.w = rng.standard_normal((self.n_out, self.k_in), dtype=np.float32)
            return
        blocks = self.k_in // 32
        self.codes = rng.integers(0, 256, (self.n_out, blocks, CODE_BYTES[kind]), dtype=np.uint8)
        self.scale = rng.standard_normal((self.n_out, blocks), dtype=np.float32) / 64
        self.minimum = rng.standard_normal((self.n_out, blocks), dtype=np.float32) / 8 if kind == "q4_1" else None

    def _attention_inputs(self, rng: np.random.Generator) -> None:
        self.heads, self.kv_heads = [(4, 2), (3, 1), (2, 2)][int(rng.integers(3))]
        self.head_dim = int(rng.choice([64, 40]))  # 64: the specialised path; 40: the general one with a tail
        lengths = [int(rng.choice([1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 300]))
                   for _ in range(int(rng.integers(1, 12)))]
        blocks_per_row = [-(-length // BLOCK_SIZE) for length in lengths]
        slots = BLOCK_SIZE * (sum(blocks_per_row) + 3)
        self.block_table = rng.permutation(slots // BLOCK_SIZE)[:sum(blocks_per_row)].astype(np.int32)
        self.row_blocks = np.cumsum([0] + blocks_per_row[:-1]).astype(np.int64)
        self.row_len = np.array(lengths, dtype=np.int32)
        self.rows = len(lengths)
        self.q = rng.standard_normal((self.rows, self.heads, self.head_dim), dtype=np.float32)
        self.k_store = rng.standard_normal((slots, self.kv_heads, self.head_dim), dtype=np.float32)
        self.v_store = rng.standard_normal((slots, self.kv_heads, self.head_dim), dtype=np.float32)

    def _quant_inputs(self, rng: np.random.Generator) -> None:
        """Random GGUF rows repacked by the kernel (planes sized generously: the repack writes inside them)."""
        number, (weights, block_bytes), scale_offsets = QUANT_FORMATS[self.kind]
        self.rows = int(rng.choice([1, 3, 8, 9, 17]))
        self.n_out = int(rng.choice([16, 37, 100, 256]))
        self.k_in = 256 * int(rng.choice([1, 2]))
        raw = rng.integers(0, 256, (self.n_out, self.k_in // weights, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            scales = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)
            raw[..., offset: offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
        groups, blocks = -(-self.n_out // 16), self.k_in // 32
        self.planes = [np.zeros(groups * blocks * 512, dtype=np.uint8) for _ in range(6)]  # each larger than needed
        self.weight = QuantPlanes(number, *(pointer(plane) for plane in self.planes))
        assert self.kernel.quant_repack(number, pointer(raw), self.n_out, self.k_in, self.weight) == 0
        self.x = rng.standard_normal((self.rows, self.k_in), dtype=np.float32)
        self.bias = rng.standard_normal(self.n_out, dtype=np.float32) if rng.random() < 0.5 else None

    def run(self) -> np.ndarray:
        if self.kind in QUANT_FORMATS:
            y = np.empty((self.rows, self.n_out), dtype=np.float32)
            assert self.kernel.quant_gemm(self.weight, pointer(self.x), pointer(self.bias), pointer(y), self.rows,
                                          self.n_out, self.k_in) == 0
            return y
        if self.kind == "attention":
            out = np.empty_like(self.q)
            status = self.kernel.paged_attention(
                pointer(self.q), pointer(out), pointer(self.k_store), pointer(self.v_store), pointer(self.block_table),
                pointer(self.row_blocks), pointer(self.row_len), self.rows, self.heads, self.kv_heads, self.head_dim,
                BLOCK_SIZE, self.k_store.shape[0], len(self.block_table), 0.125)
            assert status == 0, status
            return out
        y = np.empty((self.rows, self.n_out), dtype=np.float32)
        if self.kind == "fp32":
            self.kernel.small_gemm(pointer(self.x), pointer(self.w), pointer(self.bias), pointer(y), self.rows,
                                   self.n_out, self.k_in)
        else:
            getattr(self.kernel, f"{self.kind}_gemm")(pointer(self.x), pointer(self.codes), pointer(self.scale),
                                                      pointer(self.minimum), pointer(self.bias), pointer(y), self.rows,
                                                      self.n_out, self.k_in)
        return y


def refused_attention_calls(kernel: ctypes.CDLL, job: Job) -> list[int]:
    """The statuses of calls whose rows point outside their block table or the store: each must be refused
    before the kernel reads through the bad index (the address sanitizer reports any read that is not)."""
    statuses = []
    for field, value in (("row_len", job.row_len[0] + BLOCK_SIZE * len(job.block_table)), ("row_len", 0),
                         ("row_blocks", -1), ("row_blocks", len(job.block_table)), ("block_table", 1 << 20),
                         ("block_table", -1)):
        array = getattr(job, field).copy()
        array[0] = value
        bad = {"row_len": job.row_len, "row_blocks": job.row_blocks, "block_table": job.block_table, field: array}
        out = np.empty_like(job.q)
        statuses.append(kernel.paged_attention(
            pointer(job.q), pointer(out), pointer(job.k_store), pointer(job.v_store), pointer(bad["block_table"]),
            pointer(bad["row_blocks"]), pointer(bad["row_len"]), job.rows, job.heads, job.kv_heads, job.head_dim,
            BLOCK_SIZE, job.k_store.shape[0], len(job.block_table), 0.125))
    return statuses


def load(path: str) -> ctypes.CDLL:
    kernel = ctypes.CDLL(path)
    kernel.small_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    for name in ("q4_1_gemm", "q8_0_gemm"):
        getattr(kernel, name).argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
    kernel.paged_attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float]
    kernel.paged_attention.restype = ctypes.c_int
    kernel.small_gemm_set_threads.argtypes = [ctypes.c_int]
    planes = ctypes.POINTER(QuantPlanes)
    kernel.quant_repack.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, planes]
    kernel.quant_gemm.argtypes = [planes] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    return kernel


def main(path: str, rounds: int) -> int:
    kernel = load(path)
    rng = np.random.default_rng(0)
    kinds = ("fp32", "q4_1", "q8_0", "attention", *QUANT_FORMATS)
    jobs = [Job(kernel, kind, rng) for kind in kinds for _ in range(4)]
    kernel.small_gemm_set_threads(1)
    expected = [job.run() for job in jobs]
    assert kernel.small_gemm_set_threads(2) == 2
    mismatches: list[str] = []

    def caller(seed: int) -> None:
        order = list(range(len(jobs)))
        shuffle = random.Random(seed)
        for _ in range(rounds):
            shuffle.shuffle(order)
            for index in order:
                if not np.array_equal(jobs[index].run().view(np.uint32), expected[index].view(np.uint32)):
                    mismatches.append(f"{jobs[index].kind} job {index}")

    callers = [threading.Thread(target=caller, args=(seed,)) for seed in (1, 2)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    print(f"{len(jobs)} jobs x {rounds} rounds x 2 callers, {len(mismatches)} mismatches", flush=True)
    for mismatch in mismatches[:10]:
        print("mismatch:", mismatch, flush=True)
    refused = refused_attention_calls(kernel, next(job for job in jobs if job.kind == "attention"))
    if 0 in refused:
        print("out-of-range attention inputs were not refused:", refused, flush=True)
    return 1 if mismatches or 0 in refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
