"""Losses of AMFOR (docs/spec.md section 6): identity, triplet, focal, parsing, diversity, reconstruction, AMGD."""

from amfor.losses.amgd import AMGDLoss, AMGDOutput
from amfor.losses.diversity import DiversityLoss, diversity_loss
from amfor.losses.focal import FocalLoss, focal_loss
from amfor.losses.identity import IdentityLoss, identity_loss
from amfor.losses.parsing import ParsingLoss, mask_to_token_fractions, mask_to_tokens, parsing_loss
from amfor.losses.reconstruction import (
    PatchReconstructionLoss,
    feature_reconstruction_loss,
    patch_reconstruction_loss,
    patchify,
)
from amfor.losses.triplet import PartTripletLoss, TripletLoss, part_triplet_loss, triplet_loss

__all__ = ["AMGDLoss", "AMGDOutput", "DiversityLoss", "FocalLoss", "IdentityLoss", "ParsingLoss", "PartTripletLoss",
           "PatchReconstructionLoss", "TripletLoss", "diversity_loss", "feature_reconstruction_loss", "focal_loss",
           "identity_loss", "mask_to_token_fractions", "mask_to_tokens", "parsing_loss", "part_triplet_loss",
           "patch_reconstruction_loss", "patchify", "triplet_loss"]
