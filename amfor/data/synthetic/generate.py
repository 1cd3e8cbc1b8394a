"""Plan, render and write the synthetic dataset in the Market-1501 layout, cached with a marker file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .camera import sample_camera
from .identity import sample_identity
from .render import choose_occluder, render, sample_scene

GENERATOR_VERSION = 1
MARKER = "synthetic.json"


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and occlusion rates of one synthetic dataset (the preset names are in SIZES)."""

    num_train_ids: int
    num_val_ids: int
    num_test_ids: int
    num_cams: int = 6
    train_images_per_cam: tuple[int, int] = (2, 5)   # inclusive range per (id, camera)
    gallery_images_per_cam: tuple[int, int] = (1, 3)
    cams_per_id: tuple[int, int] = (2, 4)
    queries_per_id: int = 2
    num_distractors: int = 0
    train_occluded: float = 0.3
    gallery_occluded: float = 0.1
    coverage: tuple[float, float] = (0.2, 0.6)
    height: int = 128
    width: int = 64


SIZES = {
    "tiny": SyntheticConfig(num_train_ids=8, num_val_ids=3, num_test_ids=5, num_cams=4, train_images_per_cam=(1, 3),
                            gallery_images_per_cam=(1, 2), num_distractors=3),
    "small": SyntheticConfig(num_train_ids=60, num_val_ids=10, num_test_ids=40, num_distractors=20),
    "default": SyntheticConfig(num_train_ids=170, num_val_ids=30, num_test_ids=100, num_distractors=50),
}

# folder -> (occluded fraction key, whole-body copy folder or None)
FOLDERS = ("bounding_box_train", "query", "bounding_box_test", "query_whole", "val_query", "val_gallery",
           "val_query_whole")


def resolve_config(size: str, **overrides) -> SyntheticConfig:
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZES)}")
    cfg = asdict(SIZES[size])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown synthetic option(s) {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return SyntheticConfig(**cfg)


@dataclass(frozen=True)
class Job:
    """One image to render: where it goes, who and where it shows, and its seeds."""

    folder: str
    name: str
    pid: int
    ident: int          # index into the identity list (distractors have their own)
    cam: int
    scene_seed: int
    occ_seed: int | None  # None: whole-body image
    whole_folder: str | None = None  # also write the un-occluded copy here


class _Planner:
    """Draws the split plan (ids, cameras, image counts, occlusion flags, seeds) from one generator."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng, self.jobs, self.frame = cfg, rng, [], 0

    def add(self, folder, pid, ident, cam, occluded, whole_folder=None):
        self.frame += 1
        name = f"{pid:04d}_c{cam + 1}s1_{self.frame:06d}_00.jpg"
        seeds = self.rng.integers(2**31, size=2)
        self.jobs.append(Job(folder, name, pid, ident, cam, int(seeds[0]), int(seeds[1]) if occluded else None,
                             whole_folder))

    def cams_for_id(self) -> list[int]:
        lo, hi = self.cfg.cams_per_id
        k = int(self.rng.integers(min(lo, self.cfg.num_cams), min(hi, self.cfg.num_cams) + 1))
        return sorted(int(c) for c in self.rng.choice(self.cfg.num_cams, k, replace=False))

    def count(self, lo_hi) -> int:
        return int(self.rng.integers(lo_hi[0], lo_hi[1] + 1))

    def train(self, pids):
        for pid in pids:
            for cam in self.cams_for_id():
                for _ in range(self.count(self.cfg.train_images_per_cam)):
                    self.add("bounding_box_train", pid, pid, cam, self.rng.random() < self.cfg.train_occluded)

    def test(self, pids, qfolder, gfolder, wfolder):
        """Occluded queries (with whole-body copies) from some cameras; gallery images from every camera."""
        for pid in pids:
            cams = self.cams_for_id()
            qcams = self.rng.choice(cams, min(self.cfg.queries_per_id, len(cams) - 1), replace=False)
            for cam in sorted(int(c) for c in qcams):
                self.add(qfolder, pid, pid, cam, True, wfolder)
            for cam in cams:
                for _ in range(self.count(self.cfg.gallery_images_per_cam)):
                    self.add(gfolder, pid, pid, cam, self.rng.random() < self.cfg.gallery_occluded)


def plan(cfg: SyntheticConfig, seed: int):
    """(cameras, identities, jobs): the whole dataset as a deterministic function of (cfg, seed)."""
    rng = np.random.default_rng(seed)
    cams = [sample_camera(rng, i) for i in range(cfg.num_cams)]
    n = cfg.num_train_ids + cfg.num_val_ids + cfg.num_test_ids
    pids = rng.permutation(n) + 1
    a, b = cfg.num_train_ids, cfg.num_train_ids + cfg.num_val_ids
    idents = [sample_identity(rng) for _ in range(n + 1 + cfg.num_distractors)]
    planner = _Planner(cfg, rng)
    planner.train(sorted(int(p) for p in pids[:a]))
    planner.test(sorted(int(p) for p in pids[a:b]), "val_query", "val_gallery", "val_query_whole")
    planner.test(sorted(int(p) for p in pids[b:]), "query", "bounding_box_test", "query_whole")
    for k in range(cfg.num_distractors):
        planner.add("bounding_box_test", 0, n + 1 + k, int(rng.integers(cfg.num_cams)), False)
    return cams, idents, planner.jobs


def render_job(job: Job, cams, idents, cfg: SyntheticConfig, out: Path) -> float:
    """Render and write one job (image, mask, whole-body copy); returns the occluded body fraction."""
    size = (cfg.height, cfg.width)
    scene = sample_scene(idents[job.ident], cams[job.cam], size, np.random.default_rng(job.scene_seed))
    occ, coverage = None, 0.0
    if job.occ_seed is not None:
        occ, coverage = choose_occluder(scene, size, np.random.default_rng(job.occ_seed), cfg.coverage)
    _write(out, job.folder, job.name, *render(scene, size, occ))
    if job.whole_folder is not None:
        _write(out, job.whole_folder, job.name, *render(scene, size, None))
    return coverage


def _write(out: Path, folder: str, name: str, img: Image.Image, label: np.ndarray) -> None:
    img.save(out / folder / name, quality=92)
    Image.fromarray(label).save((out / "masks" / folder / name).with_suffix(".png"))


def generate(out_dir: str | Path, cfg: SyntheticConfig, seed: int) -> dict:
    """Render every image of (cfg, seed) into `out_dir`; returns the marker content (params + stats)."""
    out = Path(out_dir)
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / "masks" / folder).mkdir(parents=True, exist_ok=True)
    cams, idents, jobs = plan(cfg, seed)
    coverages: dict[str, list[float]] = {}
    for job in jobs:
        cov = render_job(job, cams, idents, cfg, out)
        if job.occ_seed is not None:
            coverages.setdefault(job.folder, []).append(cov)
    stats = {f: {"occluded": len(c), "mean_coverage": round(float(np.mean(c)), 4)} for f, c in coverages.items()}
    return {"params": params_of(cfg, seed), "stats": stats, "num_images": len(jobs)}


def params_of(cfg: SyntheticConfig, seed: int) -> dict:
    return json.loads(json.dumps({"version": GENERATOR_VERSION, "seed": seed, **asdict(cfg)}))


def ensure_generated(root: str | Path, size: str = "default", seed: int = 0, **overrides) -> Path:
    """The dataset folder `<root>/synthetic_<size>_seed<seed>`, generated unless an identical one exists.

    A marker file holds the generation parameters; different parameters regenerate. Generation goes to a
    temporary folder renamed into place at the end, so an interrupted run leaves nothing half-written.
    """
    cfg = resolve_config(size, **overrides)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"synthetic_{size}_seed{seed}"
    if _marker_matches(final, cfg, seed):
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        marker = generate(tmp, cfg, seed)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _replace_dir(tmp, final, cfg, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _marker_matches(path: Path, cfg: SyntheticConfig, seed: int) -> bool:
    try:
        return json.loads((path / MARKER).read_text())["params"] == params_of(cfg, seed)
    except (OSError, ValueError, KeyError):
        return False


def _replace_dir(tmp: Path, final: Path, cfg: SyntheticConfig, seed: int) -> None:
    """Move `tmp` to `final`, replacing a stale `final`; tolerate a concurrent writer that got there first."""
    if final.exists():
        if _marker_matches(final, cfg, seed):
            return
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _marker_matches(final, cfg, seed):
            raise
