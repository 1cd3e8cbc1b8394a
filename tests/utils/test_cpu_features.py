"""Native bf16 detection: torch's capability flags, /proc/cpuinfo where torch has none, and oneDNN's say."""

from __future__ import annotations

import torch

from amfor.utils import cpu_features


def test_native_bf16_needs_a_bf16_flag_and_onednn(monkeypatch):
    flags = {"avx2": True, "avx512_bf16": False, "amx_bf16": False, "cpu_name": "x"}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags), raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    native, why = cpu_features.native_bf16()
    assert not native and "neither avx512_bf16 nor amx_bf16" in why
    flags["amx_bf16"] = True
    assert cpu_features.native_bf16() == (True, "native bf16 (amx_bf16)")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    native, why = cpu_features.native_bf16()
    assert not native and "amx_bf16" in why and "oneDNN bf16: no" in why


def test_the_flags_come_from_cpuinfo_where_torch_has_no_capabilities(monkeypatch, tmp_path):
    """torch before `torch.cpu.get_capabilities` (the GPU machine's 2.11 may lack it): /proc/cpuinfo's flags line."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(cpu_features, "CPUINFO", cpuinfo)
    assert {"avx2", "avx512_bf16"} <= cpu_features.cpu_flags()
    monkeypatch.setattr(cpu_features, "CPUINFO", tmp_path / "missing")
    assert cpu_features.cpu_flags() == set()
