"""Finding the cases of a dataset on disk, whatever layout it was downloaded in.

Supported layouts (detected automatically; ``layout=`` forces one):

* ``brats2020`` -- BraTS 2020/2021: ``<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels {0,1,2,4}.
* ``brats2023`` -- BraTS 2023: ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels {0,1,2,3}
  (enhancing tumour is 3 instead of 4).
* ``nnunet`` -- nnU-Net raw: ``dataset.json`` + ``imagesTr/<case>_000{0..3}.nii.gz`` +
  ``labelsTr/<case>.nii.gz``; channel names, label values and file ending come from
  ``dataset.json`` (v1 ``modality`` or v2 ``channel_names``).  When the channel names are
  recognisable MR contrasts they are reordered to the network's t1, t1ce, t2, flair.
* ``patchddm-preprocessed`` -- the reference code's input: one folder per case with
  intensities already normalised to [0, 1].  Detected from the reference file naming
  (``<folder>/brats_train_001_t1_000_w.nii.gz``: modality is the 4th ``_`` token and more
  tokens follow) or from BraTS 2020 naming plus a marker file ``patchddm_preprocessed.json``
  in the dataset root; ``layout="patchddm-preprocessed"`` forces it.  Such cases skip
  clipping/min-max (their values are checked to lie in [0, 1]) but are still padded.

Case folders may sit at any depth up to 3 below the root (BraTS zips add a level), and a
single folder may hold several BraTS cases side by side (files are grouped by case prefix).
Sub-folders holding a ``predict.json`` (outputs of ``patchddm predict``, whose
``<case>_seg.nii.gz`` would otherwise look like label-only cases) are skipped.
Nothing here reads voxel data: see :mod:`patchddm_fast.data.volumes` for validation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.core.files import read_json_object
from patchddm_fast.data.nifti import PathLike, nifti_stem
from patchddm_fast.data.regions import BRATS2023_REGIONS, BRATS_REGIONS  # re-exported: io.BRATS_REGIONS

MODALITIES: Tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
PREPROCESSED_MARKER = "patchddm_preprocessed.json"
PREDICTION_MARKER = "predict.json"  # written by `patchddm predict`: such folders are never scanned as data
LAYOUTS = ("brats2020", "brats2023", "nnunet", "patchddm-preprocessed")
MAX_DEPTH = 3

# Names nnU-Net dataset.json files use for the four BraTS contrasts (lower case, no spaces/dashes).
_CHANNEL_SYNONYMS = {
    "t1": ("t1", "t1w", "t1n", "native", "t1native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1contrast", "t1ceweighted", "t1post", "t1wce"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair"),
}


@dataclass(frozen=True)
class Case:
    """One subject: image files in network channel order and an optional label file."""

    case_id: str
    images: Tuple[Path, ...]
    label: Optional[Path]
    folder: Path

    @property
    def files(self) -> Tuple[Path, ...]:
        return self.images + ((self.label,) if self.label is not None else ())


@dataclass
class NiftiDataset:
    """The cases found under ``root`` plus what the layout says about them."""

    root: Path
    layout: str
    cases: List[Case]
    channel_names: Tuple[str, ...] = MODALITIES
    label_values: Optional[Tuple[int, ...]] = None  # allowed label values; None = not checked
    regions: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    preprocessed: bool = False  # intensities already in [0, 1]

    @property
    def case_ids(self) -> List[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"{self.root}: no case {case_id!r}")

    def subset(self, case_ids: Sequence[str]) -> "NiftiDataset":
        wanted = set(case_ids)
        return NiftiDataset(self.root, self.layout, [c for c in self.cases if c.case_id in wanted],
                            self.channel_names, self.label_values, dict(self.regions), self.preprocessed)


# --------------------------------------------------------------------------- folder layouts
@dataclass(frozen=True)
class _FolderLayout:
    """A layout where each case's files sit in a folder and are named ``<case><sep><suffix>``."""

    name: str
    separator: str
    image_suffixes: Tuple[str, ...]
    label_suffix: str
    label_values: Tuple[int, ...]
    regions: Dict[str, Tuple[int, ...]]
    reference_naming: bool = False  # brats_train_001_t1_000_w: modality is token 3, more follow

    def parse(self, stem: str) -> Optional[Tuple[str, str]]:
        """(case prefix, suffix) if the file stem belongs to this layout."""
        known = self.image_suffixes + (self.label_suffix,)
        if self.reference_naming:
            tokens = stem.split("_")
            if len(tokens) > 4 and tokens[3] in known:
                return "_".join(tokens[:3]), tokens[3]
            return None
        if self.separator not in stem:
            return None
        prefix, suffix = stem.rsplit(self.separator, 1)
        return (prefix, suffix) if prefix and suffix in known else None

    def expected_name(self, prefix: str, suffix: str) -> str:
        return f"{prefix}{self.separator}{suffix}.nii.gz"


_BRATS2020 = _FolderLayout("brats2020", "_", MODALITIES, "seg", (0, 1, 2, 4), BRATS_REGIONS)
_BRATS2023 = _FolderLayout("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", (0, 1, 2, 3), BRATS2023_REGIONS)
_REFERENCE = _FolderLayout("patchddm-preprocessed", "_", MODALITIES, "seg", (0, 1, 2, 4), BRATS_REGIONS,
                           reference_naming=True)
_FOLDER_LAYOUTS = (_BRATS2020, _BRATS2023, _REFERENCE)


def _nifti_files(folder: Path) -> List[Tuple[str, Path]]:
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith("."):
            stem = nifti_stem(entry.name)
            if stem is not None:
                out.append((stem, Path(entry.path)))
    return out


def _match_folder(folder: Path, layout: _FolderLayout) -> Dict[str, Dict[str, Path]]:
    """{case prefix: {suffix: path}} for the files of ``folder`` that this layout recognises."""
    groups: Dict[str, Dict[str, Path]] = {}
    for stem, path in _nifti_files(folder):
        parsed = layout.parse(stem)
        if parsed is None:
            continue
        prefix, suffix = parsed
        seen = groups.setdefault(prefix, {})
        if suffix in seen:
            raise DatasetError(f"{folder}: two files for '{suffix}' of case {prefix}: {seen[suffix].name} and {path.name}")
        seen[suffix] = path
    return groups


def _candidate_folders(root: Path) -> List[Path]:
    """Folders up to MAX_DEPTH below root (root included), breadth-first, hidden ones skipped."""
    found, frontier = [root], [root]
    for _ in range(MAX_DEPTH):
        nxt = []
        for folder in frontier:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            nxt.extend(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
                       and not (Path(e.path) / PREDICTION_MARKER).is_file())
        found.extend(nxt)
        frontier = nxt
    return found


def _cases_from_groups(folder: Path, groups: Dict[str, Dict[str, Path]], layout: _FolderLayout,
                       require_labels: bool) -> List[Case]:
    cases = []
    for prefix, files in sorted(groups.items()):
        missing = [s for s in layout.image_suffixes if s not in files]
        if missing:
            names = ", ".join(f"'{s}' ({layout.expected_name(prefix, s)})" for s in missing)
            raise DatasetError(f"{folder}: case {prefix} is missing modality {names}")
        label = files.get(layout.label_suffix)
        if label is None and require_labels:
            raise DatasetError(
                f"{folder}: case {prefix} has no label file {layout.expected_name(prefix, layout.label_suffix)}"
            )
        case_id = folder.name if layout.reference_naming else prefix
        cases.append(Case(case_id, tuple(files[s] for s in layout.image_suffixes), label, folder))
    if layout.reference_naming and len(cases) > 1:
        raise DatasetError(f"{folder}: the reference layout expects one case per folder, found {len(cases)}")
    return cases


def _open_folder_dataset(root: Path, forced: Optional[str], require_labels: bool) -> Optional[NiftiDataset]:
    per_layout: Dict[str, List[Tuple[Path, Dict[str, Dict[str, Path]]]]] = {}
    for folder in _candidate_folders(root):
        for layout in _FOLDER_LAYOUTS:
            groups = _match_folder(folder, layout)
            if groups:
                per_layout.setdefault(layout.name, []).append((folder, groups))
    marker = (root / PREPROCESSED_MARKER).is_file()
    if forced == "patchddm-preprocessed" or (forced is None and marker):
        # BraTS 2020 naming with normalised intensities counts as the preprocessed layout.
        merged = per_layout.pop("brats2020", []) + per_layout.pop("patchddm-preprocessed", [])
        if merged:
            per_layout["patchddm-preprocessed"] = merged
    if forced is not None:
        per_layout = {k: v for k, v in per_layout.items() if k == forced}
    if not per_layout:
        return None
    if len(per_layout) > 1:
        counts = ", ".join(f"{k}: {len(v)} folder(s)" for k, v in sorted(per_layout.items()))
        raise DatasetError(f"{root}: files of several layouts found ({counts}); pass the layout explicitly")
    name, folders = next(iter(per_layout.items()))
    layout = {_REFERENCE.name: _REFERENCE, _BRATS2023.name: _BRATS2023}.get(name, _BRATS2020)
    cases: List[Case] = []
    for folder, groups in folders:
        if name == "patchddm-preprocessed":
            # either naming may be present in a preprocessed dataset
            for candidate in (_REFERENCE, _BRATS2020):
                g = _match_folder(folder, candidate)
                if g:
                    cases.extend(_cases_from_groups(folder, g, candidate, require_labels))
                    break
        else:
            cases.extend(_cases_from_groups(folder, groups, layout, require_labels))
    _check_unique_ids(root, cases)
    return NiftiDataset(root, name, cases, MODALITIES, layout.label_values, dict(layout.regions),
                        preprocessed=(name == "patchddm-preprocessed"))


def _check_unique_ids(root: Path, cases: Sequence[Case]) -> None:
    seen: Dict[str, Path] = {}
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(f"{root}: case id {c.case_id} appears twice ({seen[c.case_id]} and {c.folder})")
        seen[c.case_id] = c.folder


# --------------------------------------------------------------------------- nnU-Net
def _read_dataset_json(path: Path) -> dict:
    return read_json_object(path, "dataset.json")


def _norm_name(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _nnunet_channels(meta: dict, path: Path) -> Tuple[List[str], List[int]]:
    """(channel names, file index per network channel): BraTS contrasts reordered to t1,t1ce,t2,flair."""
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: dataset.json has no 'channel_names' (v2) or 'modality' (v1) mapping")
    try:
        names = [str(raw[k]) for k in sorted(raw, key=lambda k: int(k))]
    except (ValueError, KeyError) as exc:
        raise DatasetError(f"{path}: channel keys must be '0', '1', ... ({exc})") from exc
    canonical = []
    for name in names:
        hits = [m for m, syn in _CHANNEL_SYNONYMS.items() if _norm_name(name) in syn]
        canonical.append(hits[0] if len(hits) == 1 else None)
    if sorted(c for c in canonical if c) == sorted(MODALITIES) and len(names) == len(MODALITIES):
        order = [canonical.index(m) for m in MODALITIES]
        return list(MODALITIES), order
    return names, list(range(len(names)))


def _nnunet_labels(meta: dict, path: Path) -> Tuple[Tuple[int, ...], Dict[str, Tuple[int, ...]]]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: dataset.json has no 'labels' mapping")
    values, regions = set(), {}
    try:
        if all(_is_int(k) for k in raw):  # v1: {"0": "background", "1": "edema"}
            for k, name in raw.items():
                values.add(int(k))
                if int(k) != 0:
                    regions[str(name)] = (int(k),)
        else:  # v2: {"background": 0, "edema": 1} or region lists {"whole tumor": [1, 2, 3]}
            for name, v in raw.items():
                vs = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
                values.update(vs)
                if vs != (0,):
                    regions[str(name)] = vs
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: label values must be integers ({exc})") from exc
    values.add(0)
    return tuple(sorted(values)), regions


def _is_int(s) -> bool:
    try:
        int(s)
        return True
    except (TypeError, ValueError):
        return False


def _open_nnunet(root: Path, images_dir: Path, labels_dir: Optional[Path], require_labels: bool) -> NiftiDataset:
    meta_path = root / "dataset.json"
    meta = _read_dataset_json(meta_path)
    names, order = _nnunet_channels(meta, meta_path)
    label_values, regions = _nnunet_labels(meta, meta_path)
    ending = str(meta.get("file_ending", ".nii.gz"))
    groups: Dict[str, Dict[int, Path]] = {}
    for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
        if not entry.name.endswith(ending) or entry.name.startswith("."):
            continue
        stem = entry.name[: -len(ending)]
        prefix, _, idx = stem.rpartition("_")
        if not prefix or len(idx) != 4 or not idx.isdigit():
            continue
        groups.setdefault(prefix, {})[int(idx)] = Path(entry.path)
    if not groups:
        raise DatasetError(f"{images_dir}: no nnU-Net image files '<case>_0000{ending}' found")
    cases = []
    for case_id, files in sorted(groups.items()):
        missing = [i for i in range(len(names)) if i not in files]
        if missing:
            listing = ", ".join(f"channel {i} '{names[order.index(i)] if i in order else i}' "
                                f"({case_id}_{i:04d}{ending})" for i in missing)
            raise DatasetError(f"{images_dir}: case {case_id} is missing {listing}")
        extra = sorted(set(files) - set(range(len(names))))
        if extra:
            raise DatasetError(f"{images_dir}: case {case_id} has channel file(s) {extra} beyond the "
                               f"{len(names)} channels declared in {meta_path}")
        label = None
        if labels_dir is not None and (labels_dir / f"{case_id}{ending}").is_file():
            label = labels_dir / f"{case_id}{ending}"
        if label is None and require_labels:
            raise DatasetError(f"{labels_dir or root / 'labelsTr'}: case {case_id} has no label file {case_id}{ending}")
        cases.append(Case(case_id, tuple(files[i] for i in order), label, images_dir))
    return NiftiDataset(root, "nnunet", cases, tuple(names), label_values, regions, preprocessed=False)


def _nnunet_dirs(path: Path) -> Optional[Tuple[Path, Path, Optional[Path]]]:
    """(root, images dir, labels dir) if ``path`` is an nnU-Net dataset root or one of its image folders."""
    if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir():
        return path, path / "imagesTr", path / "labelsTr" if (path / "labelsTr").is_dir() else None
    if path.name.startswith("images") and (path.parent / "dataset.json").is_file():
        labels = path.parent / ("labels" + path.name[len("images"):])
        return path.parent, path, labels if labels.is_dir() else None
    return None


# --------------------------------------------------------------------------- public API
def open_dataset(path: PathLike, *, layout: str = "auto", require_labels: bool = True) -> NiftiDataset:
    """Detect the layout of ``path`` (a dataset folder or a single case folder) and list its cases.

    Raises DatasetError naming the folder when no layout matches, when a case lacks a
    modality (or its label while ``require_labels``), or when layouts are mixed.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if layout not in ("auto",) + LAYOUTS:
        raise DatasetError(f"{root}: unknown layout {layout!r}; choose from {('auto',) + LAYOUTS}")
    if layout in ("auto", "nnunet"):
        dirs = _nnunet_dirs(root)
        if dirs is not None:
            return _open_nnunet(*dirs, require_labels=require_labels)
        if layout == "nnunet":
            raise DatasetError(f"{root}: not an nnU-Net raw dataset (needs dataset.json and imagesTr/)")
    ds = _open_folder_dataset(root, None if layout == "auto" else layout, require_labels)
    if ds is None:
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "(empty)"
        wanted = {"auto": "any supported layout", **{k: f"the {k} layout" for k in LAYOUTS}}[layout]
        raise DatasetError(
            f"{root}: no files matching {wanted} found. Expected BraTS 2020/21 "
            f"'<case>/<case>_{{t1,t1ce,t2,flair,seg}}.nii.gz', BraTS 2023 '<case>/<case>-{{t1n,t1c,t2w,t2f,seg}}.nii.gz', "
            f"nnU-Net raw 'dataset.json + imagesTr/ + labelsTr/', or the reference preprocessed "
            f"'<case>/brats_train_NNN_<modality>_NNN_w.nii.gz'. Folder contains: {listing}"
        )
    return ds


def case_from_files(paths: Sequence[PathLike], case_id: Optional[str] = None,
                    label: Optional[PathLike] = None) -> Case:
    """A case from explicit image files in network channel order (t1, t1ce, t2, flair).

    The case id defaults to the files' common name prefix with trailing separators and a
    modality-like tail removed (``BraTS20_Training_001_t1.nii.gz`` ... -> ``BraTS20_Training_001``).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise DatasetError("no input files given")
    for f in files:
        if not f.is_file():
            raise DatasetError(f"{f}: file does not exist")
        if nifti_stem(f.name) is None:
            raise DatasetError(f"{f}: not a NIfTI file name (expected .nii or .nii.gz)")
    if case_id is None:
        stems = [nifti_stem(f.name) or f.name for f in files]
        prefix = os.path.commonprefix(stems).rstrip("_-. ")
        case_id = prefix or stems[0]
    return Case(case_id, tuple(files), Path(label) if label is not None else None, files[0].parent)


def label_files(folder: PathLike, suffix: str = "") -> Dict[str, Path]:
    """{case id: file} for a flat folder of single-volume NIfTI files named ``<case><suffix>.nii[.gz]``.

    With ``suffix="_seg"`` this reads prediction folders; with ``""`` nnU-Net ``labelsTr``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder does not exist")
    out: Dict[str, Path] = {}
    for stem, path in _nifti_files(folder):
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        if stem in out:
            raise DatasetError(f"{folder}: two files for case {stem}: {out[stem].name} and {path.name}")
        out[stem] = path
    return out
