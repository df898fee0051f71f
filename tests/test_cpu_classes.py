"""Every CPU class this machine can emulate: the CPU-sensitive tests again, as a lesser CPU would run them.

oneDNN honours ``ONEDNN_MAX_CPU_ISA`` (read before torch first uses it), so a
subprocess started with it runs the kernels an AVX2-only, AVX-512 or
AVX-512-VNNI CPU would. The tests marked ``cpu_class`` (exact search, batch
invariance and the bf16 bound, parity with laion-clap, library builds) run
once more under each cap that is below this CPU's own class; a cap this CPU
would run as it is (its own class, or one it lacks, such as AMX on AMD) is
skipped, since the main run covers it. The main run's class is in pytest's
header.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from clap_ws import cpu

CLASSES = ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX")


def label_under(cap: str) -> str:
    previous = os.environ.get("ONEDNN_MAX_CPU_ISA")
    os.environ["ONEDNN_MAX_CPU_ISA"] = cap
    try:
        return cpu.instruction_set()
    finally:
        if previous is None:
            del os.environ["ONEDNN_MAX_CPU_ISA"]
        else:
            os.environ["ONEDNN_MAX_CPU_ISA"] = previous


def run_as(isa: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run Python as a CPU whose oneDNN kernels go no further than ``isa`` would (``ONEDNN_MAX_CPU_ISA``)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def emulated(isa: str):
    """A parameter that runs only where ``isa`` is a lesser class than this CPU's own."""
    native = label_under("ALL")
    reason = f"this CPU ({native}) runs {isa} as it is: the main run covers it"
    return pytest.param(isa, marks=pytest.mark.skipif(label_under(isa) == native or not cpu.features(),
                                                      reason=reason))


@pytest.mark.slow
@pytest.mark.parametrize("isa", [emulated(isa) for isa in CLASSES])
def test_the_cpu_sensitive_tests_pass_as_a_lesser_cpu(isa):
    result = run_as(isa, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cpu_class", "tests", timeout=1500)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail
    assert f"cpu class: {label_under(isa)}" in result.stdout, tail  # the run really was that class


ISA_SCRIPT = """
import json, numpy as np
from clap_ws import cpu
from clap_ws.model import resolve_precision
from clap_ws.search.scan import QUERY_LEVELS, _Int8Rows, _adversarial, choose_kernel
import torch
rows, queries = _adversarial(np.random.default_rng(0))
errors = {}
for kernel, levels in QUERY_LEVELS.items():
    probe = _Int8Rows(levels)
    probe.append(rows)
    for query in queries:
        approx, bound = probe.scores(query[None])
        excess = float((np.abs(approx.numpy()[0] - rows @ query) - bound[0]).max())
        errors[kernel] = max(errors.get(kernel, -1.0), excess)
print(json.dumps({"kernel": choose_kernel(), "excess": errors, "isa": cpu.instruction_set(),
                  "precision": resolve_precision("auto", torch.device("cpu"))}))
"""


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_without_vnni_8_bit_queries_overflow_and_7_bit_ones_are_chosen(isa):
    """x86 int8 kernels without VNNI add u8 x s8 pairs in int16 with saturation: 8-bit query codes break
    the bound (so the check can fail), 7-bit ones cannot; and bf16 is emulated there, so ``auto`` is fp32."""
    result = run_as(isa, "-c", ISA_SCRIPT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["excess"]["int8"] > 0.05  # saturated: far outside the bound
    assert found["excess"]["int8-7bit"] <= 0
    assert found["kernel"] == "int8-7bit"
    assert found["precision"] == "fp32" and "VNNI" not in found["isa"] and "BF16" not in found["isa"]


@pytest.mark.skipif(not {"VNNI", "AMX"} & set(cpu.features()), reason="this CPU has no VNNI")
def test_with_vnni_8_bit_queries_are_exact_enough_and_chosen():
    from clap_ws.search.scan import choose_kernel

    assert choose_kernel() == "int8"
