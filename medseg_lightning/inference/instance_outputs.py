"""``medseg predict`` outputs of instance models: an instance-label map and a table of the objects.

The map has the input's geometry like a semantic mask (NIfTI with its affine and header, 16-bit PNG for 2D
images, one 16-bit PNG per slice for slice folders), but each object has its own integer (0 = none). The table
``<case>_objects.csv`` has one row per object: its class, score, size in voxels (and ml when the spacing is
known), centroid and bounding box in the input's voxel indices.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.instances import Objects
from medseg_lightning.data.io import Volume
from medseg_lightning.inference.detections import OBJECT_COLUMNS, object_table, semantic_labels
from medseg_lightning.inference.inputs import PredictInput, slice_output_stems
from medseg_lightning.inference.outputs import atomic_nifti, atomic_png, to_reference_orientation
from medseg_lightning.utilities.files import atomic_write


def write_objects(objects: Objects, case: PredictInput, volume: Volume, reference: nib.Nifti1Image | None,
                  config: ExperimentConfig, out_dir: Path) -> tuple[Path, np.ndarray]:
    """Writes the instance map and the object table; returns the map's path and the merged label map."""
    ids = objects.ids.astype(np.uint16)
    if case.kind == "slices":
        path = _write_slice_maps(ids, case, out_dir)
    elif reference is None:
        path = out_dir / f"{case.name}.png"
        atomic_png(ids[:, :, 0], path, np.uint16)
    else:
        path = out_dir / f"{case.name}.nii.gz"
        ids = to_reference_orientation(ids, volume.affine, reference, np.uint16)
        atomic_nifti(ids, reference, path, np.uint16)
    oriented = Objects(ids, objects.classes, objects.scores)
    columns = [name for name in OBJECT_COLUMNS if volume.spacing_known or name != "volume_ml"]
    table = pd.DataFrame(object_table(oriented, tuple(volume.spacing), volume.spacing_known, config.data.labels),
                         columns=columns)
    atomic_write(out_dir / f"{case.name}_objects.csv", lambda temporary: table.to_csv(temporary, index=False))
    return path, semantic_labels(objects)


def _write_slice_maps(ids: np.ndarray, case: PredictInput, out_dir: Path) -> Path:
    """One ``<slice stem>_instances.png`` (16-bit object ids) per input slice."""
    from medseg_lightning.data.slices import slice_files

    stems = slice_output_stems(case, slice_files(case.paths[0])[0])
    for index, stem in enumerate(stems):
        atomic_png(ids[:, :, index], out_dir / f"{stem}_instances.png", np.uint16)
    return out_dir / f"{stems[0]}_instances.png"
