"""`python -m amfor.extract --checkpoint PATH --input DIR|GLOB|LIST.txt --output feats.safetensors|.npz` (or
`amfor-extract`): ReID features of a folder of images, written as a features file (`amfor.deploy.feature_file`).

--checkpoint  a training checkpoint (.pt) or a weights file (.safetensors, `amfor.export --format weights`)
--input       a folder (searched recursively for image files), a glob pattern (quoted: "crops/**/*.jpg"), or a
              .txt file listing one image path per line (relative paths are relative to the list's folder)
--output      the features file, .safetensors or .npz: `features` [N, D] (L2-normalised), with --parts also
              `parts` [N, 1+P, D] and `visibility` [N, 1+P]; `paths` relative to the input folder (the glob's
              folder; as written in a list) in the rows' order; `camids` with --camids-from-names
Images are preprocessed as the evaluation does (the model's size, mean and std). An image that cannot be read is
skipped: it is printed and listed in the file's metadata (`skipped`), and every other image is kept.
--camids-from-names reads the camera from Market/Duke-style names (`0002_c1s1_000451_03.jpg` -> camera 0); a name
without one, or no flag, is an unknown camera. Under `torchrun --nproc_per_node=N -m amfor.extract ...` each process
extracts a contiguous share of the images; rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch

from .cli import USER_ERRORS, one_line, prog_name, report
from .deploy.feature_file import SUFFIXES, FeatureFileError, FeatureSet, save_features
from .extras import require
from .utils import distributed as du

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InputError(ValueError):
    """--input names nothing to extract (a missing path, a folder or glob without images, no readable image), or
    --device names no device here."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def relative(path: Path, base: Path) -> str:
    """`path` relative to `base` (posix), as it is when `base` is "."."""
    return path.as_posix() if base == Path(".") else path.relative_to(base).as_posix()


def list_inputs(spec: str) -> tuple[list[Path], list[str], int]:
    """--input -> (image files, their names as stored: relative to the folder, the glob's folder or as written in
    the list, number of files left out because their suffix is no image's)."""
    path = Path(spec)
    if glob.has_magic(spec):
        parts = path.parts
        base = Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        images = [p for p in found if is_image(p)]
        return images, [relative(p, base) for p in images], len(found) - len(images)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        images = [p for p in found if is_image(p)]
        return images, [relative(p, path) for p in images], len(found) - len(images)
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        names = [line for line in lines if line and not line.startswith("#")]
        return [p if p.is_absolute() else path.parent / p for p in map(Path, names)], names, 0
    if path.is_file():
        raise InputError(f"--input {spec}: a folder, a glob pattern or a .txt list of images, not a "
                         f"{path.suffix or 'suffix-less'} file")
    raise InputError(f"--input {spec}: no such folder or list")


def camids_from_names(names: list[str]) -> torch.Tensor:
    """[N] 0-based cameras read from Market-style file names (`_c<k>`, 1-based), -1 where a name has none."""
    from .data.datasets.base import MARKET_PATTERN

    ids = []
    for name in names:
        match = MARKET_PATTERN.search(Path(name).name)  # <pid>_c<camera>: Market, Duke and MSMT names
        ids.append(int(match.group(2)) - 1 if match else -1)
    return torch.tensor(ids, dtype=torch.long)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog_name("amfor.extract"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint (.pt) or a weights file (.safetensors)")
    parser.add_argument("--input", required=True, help="a folder, a glob pattern or a .txt list of images")
    parser.add_argument("--output", required=True, help="the features file: .safetensors or .npz")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image loader processes (0: in this process)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="run the model under autocast in this type")
    parser.add_argument("--parts", action="store_true", help="also store the part features and their visibility")
    parser.add_argument("--camids-from-names", action="store_true",
                        help="cameras from Market-style names (_c1 -> 0); else every camera unknown")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")
    return parser, args


def extract_share(extractor, files: list[Path], camids: torch.Tensor | None, parts: bool
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[tuple[int, str]]]:
    """This rank's share of `files`: (outputs, one row per file of the share, zeros for a skipped one; [n] bool
    kept; [(global index, error)] of the skipped), with a progress bar on rank 0."""
    from tqdm import tqdm

    share = du.shard(len(files))
    ids = camids[share] if camids is not None else None
    with tqdm(total=share.stop - share.start, unit="img", desc="extract", disable=not du.is_main(),
              file=sys.stderr) as bar:
        out, kept, errors = extractor.run(files[share], ids, parts=parts, skip_bad=True, progress=bar.update)
    n = share.stop - share.start
    rows = {k: v.new_zeros((n, *v.shape[1:])) for k, v in out.items()}
    index = torch.tensor(kept, dtype=torch.long)
    for k, v in out.items():
        rows[k][index] = v
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return rows, mask, [(share.start + i, e) for i, e in errors]


def gather(rows: dict[str, torch.Tensor], mask: torch.Tensor, errors: list, n: int, device: torch.device):
    """Every rank's rows in rank order (rank 0 gets them all), and every rank's skipped images."""
    if du.get_world_size() == 1:
        return rows, mask, errors
    device = device if device.type == "cuda" else torch.device("cpu")
    rows = {k: du.all_gather_cat(v.to(device), n).cpu() for k, v in rows.items()}
    mask = du.all_gather_cat(mask.to(device), n).cpu()
    errors = [e for part in du.all_gather_object(errors) for e in part]
    return rows, mask, errors


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        output = Path(args.output)
        if output.suffix not in SUFFIXES:
            raise FeatureFileError(f"--output {output}: a features file ends in {' or '.join(SUFFIXES)}")
        if output.suffix == ".safetensors":
            require("safetensors", extra="safetensors", purpose=f"--output {output}")
        files, names, ignored = list_inputs(args.input)
        if not files:
            raise InputError(f"--input {args.input}: no image files (suffixes {', '.join(IMAGE_SUFFIXES)})")
        try:
            device = du.resolve_device(args.device)
        except RuntimeError as exc:  # an unknown device name, or CUDA asked for where there is none
            raise InputError(f"--device {args.device}: {one_line(exc)}") from exc
        du.init_distributed(device)
        from .deploy.extractor import Extractor

        extractor = Extractor(args.checkpoint, device=device, dtype=DTYPES[args.dtype], batch_size=args.batch_size,
                              num_workers=args.num_workers)
        camids = camids_from_names(names) if args.camids_from_names else None
        rows, mask, errors = gather(*extract_share(extractor, files, camids, args.parts), len(files), device)
        if not bool(mask.any()):  # every rank knows: none of them waits for rank 0
            raise InputError(f"--input {args.input}: none of the {len(files)} images could be read ({errors[0][1]})")
        if du.is_main():
            write(output, args, extractor, names, rows, mask, errors, camids, ignored)
        du.barrier()
    except (InputError, FeatureFileError, *USER_ERRORS) as exc:  # no dataset here: no hint about its bad images
        return report(parser.prog, exc, hint=None)
    finally:
        du.cleanup()
    return 0


def write(output: Path, args, extractor, names: list[str], rows: dict, mask: torch.Tensor, errors: list,
          camids: torch.Tensor | None, ignored: int) -> None:
    """Rank 0: the features file of the images read, and the skipped ones printed and in its metadata."""
    from . import __version__
    from .deploy.weights import data_config_record

    skipped = [(names[i], e) for i, e in sorted(errors)]
    for name, error in skipped:
        print(f"skipped {name}: {error}", file=sys.stderr)
    keep = mask.nonzero().flatten()
    metadata = {"checkpoint": str(args.checkpoint), "input": str(args.input), "amfor_version": __version__,
                "skipped": json.dumps([[n, e] for n, e in skipped]),
                "data_config": json.dumps(data_config_record(extractor.model)),
                "camids": "from names" if camids is not None else "unknown"}
    features = FeatureSet(features=rows["features"][keep], paths=[names[i] for i in keep.tolist()],
                          parts=rows["parts"][keep] if "parts" in rows else None,
                          visibility=rows["visibility"][keep] if "visibility" in rows else None,
                          camids=camids[keep] if camids is not None else None, metadata=metadata)
    save_features(output, features)
    extra = f", {ignored} non-image files ignored" if ignored else ""
    print(f"wrote {output}: {len(features)} images, {features.features.shape[1]} dims, {len(skipped)} skipped{extra}")


if __name__ == "__main__":
    sys.exit(main())
