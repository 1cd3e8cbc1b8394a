"""The ablation study of AMFOR's components on the synthetic set: a research tool beside the library.

It imports `amfor` and drives `python -m amfor.train` in subprocesses; `amfor` never imports it. Run it from the
repository root: `python -m projects.ablation --help`.
"""
