"""Triton kernels of amfor, installed as `amfor.kernels`; one module per op family (see amfor/ops)."""
