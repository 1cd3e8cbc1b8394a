"""What the data and the models agree on: the part labels of the masks and the ReID input normalisation.

A light module (no import beyond the standard library) that `amfor.data` and `amfor.models` both
read, so that the models never import the data pipeline.

Part ids are image-space: "left" is the image's left half of the body, so a horizontal flip swaps the pairs
2<->3, 5<->6 and 7<->8. Label 0 is background; 1..8 are the P = 8 body parts of docs/spec.md section 4.
"""

from __future__ import annotations

PART_NAMES = ("background", "head", "left_arm", "right_arm", "torso", "left_leg", "right_leg", "left_foot",
              "right_foot")
NUM_PARTS = len(PART_NAMES) - 1  # P: body parts, background excluded
FLIP_PAIRS = ((2, 3), (5, 6), (7, 8))  # label pairs a horizontal flip exchanges
NO_MASK = -1  # part-mask value meaning "this image has no parsing mask"

# TransReID's and CLIP-ReID's normalisation (x - 0.5) / 0.5; the models' `pretrained_cfg` (amfor/models/registry.py)
# names it, and the loaders take what the model's `pretrained_cfg` says (`amfor.data.resolve_data_config`)
REID_MEAN = (0.5, 0.5, 0.5)
REID_STD = (0.5, 0.5, 0.5)
