"""Runs a model over many KV sessions in one packed pass, on the small-batch kernels where they serve.

The sessions and their caches live in specdec/compute/sessions.py; this module owns the model, the
kernel installation and the KV block pool the caches draw from.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from specdec.compute import packed
from specdec.compute.paged_kv import KVPool, PagedCache
from specdec.compute.sessions import KVSession


class ModelRunner:
    """Runs the model over sessions, many at once (specdec/compute/packed.py). Stateless apart from the model."""

    def __init__(self, model: torch.nn.Module, device: torch.device, small_gemm: bool = False,
                 gguf_path: Path | None = None, quantise_to: str = ""):
        from specdec.compute import gguf_blocks
        from specdec.compute import small_gemm as kernel
        from specdec.compute.quant_weights import QuantLinear

        self.model = model
        self.device = device
        # Decode and verify steps feed a few rows; the kernel keeps them memory-bound and batch-invariant.
        self.small_gemm_layers = kernel.install(model) if small_gemm and device.type == "cpu" else 0
        # Layers loaded quantised (specdec.models.gguf_quantised) run every pass on the kernel: they have no BLAS path.
        self.quantised_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
        # The kernel splits each layer among the process's threads itself; torch's own pool would spin
        # beside it between layers for the small ops it runs there, so torch keeps one thread for passes
        # the kernel serves and gets them all back for prefill-sized ones, which go to BLAS.
        self.threads = torch.get_num_threads()
        self.kernel_rows = kernel.MAX_ROWS if self.small_gemm_layers and not self.quantised_layers else 0
        if self.small_gemm_layers or self.quantised_layers:
            kernel.set_threads(self.threads)
            torch.set_num_threads(1)
        # Weights de-quantised from a GGUF are read in its blocks: a fifth of the bytes, the same values.
        self.gguf_block_layers = gguf_blocks.attach(model, gguf_path) if self.small_gemm_layers and gguf_path else 0
        # Drafters may go further: rounding their own weights to blocks costs acceptance at most.
        if self.small_gemm_layers and quantise_to and not self.gguf_block_layers:
            self.gguf_block_layers = gguf_blocks.quantise_in_place(model, quantise_to)
        # Attention over the packed rows of many sessions, each reading only its own KV.
        packed.install(model)
        self.pool = KVPool()

    def new_cache(self) -> PagedCache:
        return PagedCache(self.pool)

    @torch.inference_mode()
    def extend(self, sessions: list[KVSession], output_hidden: bool = False,
               keep_logits: int | list[int] = 1) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Feeds each session's uncached ids in one packed pass; returns per session
        (logits [keep, V], last hidden [n, H] | None).

        Row i of a session's logits predicts the token after its last `keep` ids (a fully cached session
        first uncaches its last id); keep_logits is one count for all sessions or one per session, and 0
        means no logits (a prefill chunk that only fills the cache).
        """
        rows = []
        for session in sessions:
            if not session.ids:
                raise ValueError("nothing to feed: the session has no tokens")
            if session.cached_len >= len(session.ids):
                # Logits are not kept, only KV: a fully cached session recomputes its last token.
                session.crop_kv(len(session.ids) - 1)
            if session.cache is None:
                session.cache = self.new_cache()
            rows.append((session.ids[session.cached_len:], session.cached_len, session.cache))
        keep = keep_logits if isinstance(keep_logits, list) else [keep_logits] * len(sessions)
        blas = self.kernel_rows and sum(len(new_ids) for new_ids, _, _ in rows) > self.kernel_rows
        if blas:
            torch.set_num_threads(self.threads)
        try:
            results = packed.packed_forward(self.model, rows, self.device, keep, output_hidden)
        finally:
            if blas:
                torch.set_num_threads(1)
        for session in sessions:
            session.cached_len = len(session.ids)
        return results


def measure_pass_cost(runner: ModelRunner, max_rows: int, context: int = 32, repeats: int = 3,
                      token: int = 1) -> list[tuple[int, float]]:
    """(rows, median seconds) of one pass feeding n new rows to a session of `context` cached ids, for
    n = 1, 2, 4, ... up to max_rows: the pass-cost curve bench.verify_cost prints, measured in place, so
    the coordinator weighs a draft row by what a row costs on this machine, model and kernel."""
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n < max_rows] + [max_rows]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    session = KVSession("pass-cost", ids=[token] * context)
    runner.extend([session], keep_logits=0)  # the context, cached once; each pass is cropped back to it
    for repeat in range(repeats + 1):  # the first round warms the weights and the kernel's threads
        for n in sizes:
            session.ids.extend([token] * n)
            started = time.perf_counter()
            runner.extend([session], keep_logits=n)
            if repeat:
                times[n].append(time.perf_counter() - started)
            session.crop(context)
    session.cache = None  # gives the blocks back to the pool
    return [(n, statistics.median(t)) for n, t in times.items()]
