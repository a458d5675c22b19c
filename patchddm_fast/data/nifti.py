"""Reading and writing NIfTI volumes with every failure turned into a :class:`DatasetError`.

Reading decodes the whole array on purpose: a truncated ``.nii.gz`` loads its header fine
and only fails when the data are decompressed, and that must happen during validation,
not hours into training.  Writing copies the reference image's header (qform/sform and
their codes, zooms, units, orientation) so predictions overlay the input in any viewer,
and goes through a temporary file renamed into place, so an interrupted run never leaves
a half-written output behind.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Tuple

import nibabel as nib
import numpy as np

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.core.files import PathLike, atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-3  # mm (translations) / unitless (direction cosines x zooms)


def nifti_stem(name: str) -> str | None:
    """File name without its NIfTI suffix, or None when it is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _squeeze_to_3d(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Drop trailing singleton axes (some exporters write (X, Y, Z, 1))."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_image(path: PathLike) -> nib.Nifti1Image:
    """Open a 3D NIfTI file (header only) or raise a DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DatasetError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DatasetError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    shape = _squeeze_to_3d(img.shape)
    if len(shape) != 3:
        raise DatasetError(
            f"{path}: expected a 3D volume, got shape {tuple(img.shape)} "
            f"({len(img.shape)}D); store each modality in its own 3D file"
        )
    return img


def check_gzip_stream(path: PathLike) -> None:
    """Read a ``.gz`` file to its end so gzip checks its CRC-32 and length trailer.

    nibabel decodes exactly the bytes the header asks for and stops there, so a file cut
    short by a few bytes, or with flipped bits inside the compressed data, loads without
    complaint -- as silently wrong voxels.  Reading on to the end-of-stream marker makes
    both an error.
    """
    path = Path(path)
    if path.suffix != ".gz":
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: truncated or corrupt image data (gzip stream: {exc})") from exc


GZIP_MAX_RATIO = 1032  # deflate cannot compress more than ~1032:1, so a .gz of n bytes holds < 1032 n


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_claimed_size(img: nib.Nifti1Image, path: PathLike, dtype=np.float32) -> None:
    """Compare the voxel count the header claims with what the file can hold and memory can take.

    A damaged header claiming 20000^3 voxels would otherwise fail deep inside decoding as a
    MemoryError (or allocate for minutes); this says what the header claims and why it is
    impossible, naming the file.
    """
    path = Path(path)
    shape = tuple(int(s) for s in img.shape)
    voxels = int(np.prod(shape, dtype=object))
    stored = voxels * int(img.get_data_dtype().itemsize)
    size = path.stat().st_size
    claim = f"header claims shape {shape} ({stored / 1e9:.3g} GB of voxel data)"
    if path.suffix == ".gz":
        if stored > GZIP_MAX_RATIO * size + 1024:
            raise DatasetError(f"{path}: {claim}, more than a {size}-byte gzip file can hold; "
                               f"the header is corrupt or the file truncated")
    else:
        offset = int(getattr(img.dataobj, "offset", 0) or 0)
        if offset + stored > size:
            raise DatasetError(f"{path}: {claim} from byte {offset}, but the file has {size} bytes; "
                               f"the header is corrupt or the file truncated")
    needed = voxels * np.dtype(dtype).itemsize
    memory = _physical_memory()
    if memory and needed > memory:
        raise DatasetError(f"{path}: {claim}; as {np.dtype(dtype).name} that needs {needed / 1e9:.3g} GB, more than "
                           f"this machine's {memory / 1e9:.3g} GB of memory; the header is probably corrupt")


def read_array(img: nib.Nifti1Image, path: PathLike, dtype=np.float32) -> np.ndarray:
    """Decode the full voxel array (scaling applied) as ``dtype``; reject damaged or non-finite data."""
    path = Path(path)
    check_claimed_size(img, path, dtype)
    check_gzip_stream(path)
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise DatasetError(f"{path}: not enough memory to decode shape {tuple(img.shape)}") from None
    except Exception as exc:
        raise DatasetError(
            f"{path}: truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from exc
    data = np.asarray(data).reshape(_squeeze_to_3d(data.shape))
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        finite = np.isfinite(data)
        if not finite.all():
            raise DatasetError(f"{path}: {int((~finite).sum())} non-finite voxel values (NaN or Inf)")
    return data.astype(dtype, copy=False)


def load_volume(path: PathLike, dtype=np.float32) -> Tuple[np.ndarray, nib.Nifti1Image]:
    """(3D array, image) for one file, fully validated (exists, NIfTI, 3D, decodable, finite)."""
    img = load_image(path)
    return read_array(img, path, dtype), img


def affines_match(a: np.ndarray, b: np.ndarray, atol: float = AFFINE_ATOL) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=0.0, atol=atol))


def shifted_affine(affine: np.ndarray, offset) -> np.ndarray:
    """The affine of a grid whose voxel ``n`` is voxel ``n - offset`` of ``affine``'s grid (a grid
    padded by ``offset`` voxels before each axis, or cropped where an offset is negative)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] -= out[:3, :3] @ np.asarray(offset, dtype=np.float64)
    return out


def save_like(data: np.ndarray, reference: nib.Nifti1Image, path: PathLike, dtype, description: str = "") -> Path:
    """Write ``data`` with ``reference``'s header (affine, qform/sform codes, zooms, units) as ``dtype``.

    Scaling and display-range fields are reset because they describe the reference's
    intensities, not ours.  The file appears atomically (temp file + rename).
    """
    path = Path(path)
    ref_shape = _squeeze_to_3d(reference.shape)
    if tuple(data.shape) != ref_shape:
        raise ValueError(f"{path}: data shape {tuple(data.shape)} differs from the reference grid {ref_shape}")
    header = reference.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(dtype)
    header.set_slope_inter(np.nan, np.nan)
    header["cal_min"] = 0
    header["cal_max"] = 0
    if description:
        header["descrip"] = description[:79].encode("ascii", "replace")
    return _save(type(reference)(np.asarray(data).astype(dtype), reference.affine, header=header), path)


def save_volume(data: np.ndarray, affine: np.ndarray, path: PathLike) -> Path:
    """Write ``data`` (3D, or 4D with channels last) as NIfTI-1 on the grid ``affine`` describes,
    in ``data``'s own dtype; atomically (temp file + rename).  For outputs with no input file to
    copy a header from (``sample`` on phantoms and cached volumes)."""
    return _save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), Path(path))


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    # nibabel picks the format (and gzip) from the name, so the temporary name keeps the suffix.
    with atomic_path(path, suffix=".tmp" + (".nii.gz" if path.name.endswith(".gz") else ".nii")) as tmp:
        nib.save(img, str(tmp))
    return path
