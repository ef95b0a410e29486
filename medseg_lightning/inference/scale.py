"""Is a new input at the scale the model was trained on? The check behind ``medseg predict``'s spacing errors.

The preprocessing keeps the voxel spacing (``resize_mode: pad_crop``, or no ``target_size``): a structure covers
as many pixels as its size in mm divided by the pixel size. A model trained on 1 mm pixels and given a 0.5 mm scan
sees every structure twice as large as it learnt, and its masks degrade without any error. So an input whose
in-plane voxel size differs from the training median by more than ``TOLERANCE`` either way, or that has no
physical spacing at all (a 2D image) while the training scans had one, is refused, naming the file and both
sizes. ``resize`` models interpolate every slice to one size, whatever its spacing, and are not checked; nor are
models trained on images without a spacing, or saved before their training spacing was recorded.
"""

from __future__ import annotations

from medseg_lightning.config.schema import ExperimentConfig
from medseg_lightning.data.io import DataError, Volume

TOLERANCE = 1.5


def check_spacing(volume: Volume, name: str, config: ExperimentConfig,
                  training: tuple[float, float, float] | None) -> None:
    """Raises ``DataError`` when ``volume`` is not at the model's training scale (see the module docstring)."""
    if training is None or config.data.preprocessing.resize_mode == "resize":
        return
    axes = [axis for axis in range(3) if axis != config.data.slicing.axis]
    trained = " x ".join(f"{training[axis]:.3g}" for axis in axes)
    advice = "or pass --ignore-spacing if you know the scale matches"
    if not volume.spacing_known:
        raise DataError(f"{name}: no physical pixel size (a 2D image); the model was trained on {trained} mm pixels "
                        "without resampling, so it would see this image at an unknown scale. Give the scan as NIfTI "
                        f"or DICOM, which carry the spacing, {advice}")
    ratios = [volume.spacing[axis] / training[axis] for axis in axes]
    worst = max(ratios, key=lambda ratio: max(ratio, 1 / ratio))
    if max(worst, 1 / worst) > TOLERANCE:
        found = " x ".join(f"{volume.spacing[axis]:.3g}" for axis in axes)
        raise DataError(f"{name}: in-plane voxel size {found} mm; the model was trained on {trained} mm without "
                        f"resampling, so structures would appear {1 / worst:.2g}x their trained size. Resample the "
                        f"scan to about {trained} mm, {advice}")
