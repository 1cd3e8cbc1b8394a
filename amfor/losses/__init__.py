"""Losses of AMFOR (SPEC-AMFOR.md section 6): identity, triplet, focal, parsing, diversity, reconstruction, AMGD."""

from amfor.losses.amgd import AMGDLoss, AMGDOutput

__all__ = ["AMGDLoss", "AMGDOutput"]
