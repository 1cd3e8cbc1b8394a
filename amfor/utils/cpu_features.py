"""What the processor offers for low-precision arithmetic: whether bf16 runs natively (AVX-512 bf16 or AMX), read
once for `train.amp=auto` and the inference benchmark's bf16 row."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The processor's feature flags: torch's own reading where it has one (`torch.cpu.get_capabilities`), else
    /proc/cpuinfo's; empty where neither says."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return {name for name, on in capabilities().items() if on is True}
    try:
        return set(CPUINFO.read_text().split())
    except OSError:
        return set()


def native_bf16() -> tuple[bool, str]:
    """(whether bf16 matrix products run natively on this CPU, why): an avx512_bf16 or amx_bf16 flag and oneDNN's
    bf16 support. Without them, bf16 is emulated in float32 and slower than float32 itself."""
    found = sorted(cpu_flags() & set(BF16_FLAGS))
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if found and onednn:
        return True, f"native bf16 ({', '.join(found)})"
    return False, f"no native bf16 on this CPU (flags: {', '.join(found) or 'neither ' + ' nor '.join(BF16_FLAGS)}; " \
                  f"oneDNN bf16: {'yes' if onednn else 'no'})"
