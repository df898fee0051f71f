"""What the CPU can do, as the kernels torch calls will see it.

Precision ``auto``, the exact-search pre-scan and every timing depend on the
instruction set: bf16 is native only with AVX512-BF16 or AMX (elsewhere oneDNN
emulates it, slower than fp32), and int8 dot products accumulate in 32 bits
only with VNNI. Machines of one kind differ here, so every published figure
names it (:func:`instruction_set`).

oneDNN honours ``ONEDNN_MAX_CPU_ISA`` (read before torch first uses it): a
process run with ``ONEDNN_MAX_CPU_ISA=AVX2`` behaves as an AVX2-only CPU would,
and this module reports that CPU, not the one underneath.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA), least capable first. Each allows the features of the ones before it,
# except that AVX-VNNI (the 256-bit form) is not part of the AVX-512 ISAs below AVX512_CORE_FP16: oneDNN's
# avx512_core, avx512_core_vnni and avx512_core_bf16 leave it out, so a cap at one of those hides it.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")
_WITHOUT_AVX_VNNI = ("AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16")
_FEATURES = (  # (label, /proc/cpuinfo flag, the least oneDNN ISA that uses it)
    ("AVX2", "avx2", "AVX2"),
    ("AVX-VNNI", "avx_vnni", "AVX2_VNNI"),
    ("AVX-512", "avx512f", "AVX512_CORE"),
    ("VNNI", "avx512_vnni", "AVX512_CORE_VNNI"),
    ("BF16", "avx512_bf16", "AVX512_CORE_BF16"),
    ("AMX", "amx_bf16", "AVX512_CORE_AMX"),
)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where there is none (not Linux)."""
    if platform.system() != "Linux":
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _allowed(isa: str) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (if set) lets oneDNN use ``isa`` (one of :data:`_FEATURES`' ISAs)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in ("", "ALL", "DEFAULT") or cap not in _ONEDNN_ISAS:
        return True
    if isa == "AVX2_VNNI" and cap in _WITHOUT_AVX_VNNI:
        return False
    return _ONEDNN_ISAS.index(isa) <= _ONEDNN_ISAS.index(cap)


def features() -> list[str]:
    """The x86 features that matter here, present and allowed: a subset of AVX2, AVX-512, VNNI, BF16, AMX."""
    flags = cpu_flags()
    return [label for label, flag, isa in _FEATURES if flag in flags and _allowed(isa)]


def has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX), not by emulation."""
    return bool({"BF16", "AMX"} & set(features()))


def instruction_set() -> str:
    """A label for figures and ``info``, e.g. ``"AVX-512 VNNI BF16"``, ``"AVX2"``, or the machine's name off x86."""
    found = features()
    if not found:
        return platform.machine() or "unknown"
    if "AVX-512" in found:
        found.remove("AVX2")
    return " ".join(found)


def describe() -> str:
    """The CPU's model name, core count and instruction set, for benchmark reports."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {instruction_set()}, {platform.system()}"
