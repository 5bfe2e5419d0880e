"""The kernel's thread pool and index checks under gcc's sanitizers: no data race, no read out of range,
no undefined behaviour, and every output bit-equal to a single-thread run (tests/compute/kernel_stress.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.compute import small_gemm

STRESS = Path(__file__).with_name("kernel_stress.py")
REPORTS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:")
SANITIZERS = {
    # flags, the runtime to preload into Python, its options
    "thread": (["-fsanitize=thread"], "libtsan.so", {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}),
    "address,undefined": (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"], "libasan.so",
                          {"ASAN_OPTIONS": "detect_leaks=0 exitcode=66", "UBSAN_OPTIONS": "print_stacktrace=1"}),
}

pytestmark = pytest.mark.skipif(not small_gemm._cpu_has_avx2_fma(), reason="the kernel needs an x86 CPU with AVX2")


def _runtime(compiler: str, name: str) -> str | None:
    """The sanitizer runtime's path, or None where the compiler has none (it then echoes the bare name)."""
    found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_mixed_jobs_from_two_callers_have_no_sanitizer_report_and_single_thread_bits(sanitizer, tmp_path):
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc: the sanitizer runtimes come with it")
    flags, runtime_name, options = SANITIZERS[sanitizer]
    runtime = _runtime(compiler, runtime_name)
    if runtime is None:
        reason = f"{compiler} has no {runtime_name}: the {sanitizer} sanitizer cannot run here"
        print(reason)
        pytest.skip(reason)
    library = tmp_path / "small_gemm-sanitized.so"
    optimised = [flag for flag in small_gemm.compile_flags() if not flag.startswith("-O")]
    subprocess.run([compiler, *optimised, "-O1", "-g", "-fno-omit-frame-pointer", *flags, "-o", str(library),
                    *map(str, small_gemm.SOURCES)], check=True)
    result = subprocess.run([sys.executable, str(STRESS), str(library), "60"], capture_output=True, text=True,
                            timeout=240, env={**os.environ, "LD_PRELOAD": runtime, **options})
    print(result.stdout, result.stderr[-4000:])
    assert not [report for report in REPORTS if report in result.stderr], result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "0 mismatches" in result.stdout
