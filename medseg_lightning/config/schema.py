"""Typed experiment configuration: every knob is a validated field with a default that works.

The schema lives apart from the loader (``config.py``) so that reading the fields is reading the reference.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from medseg_lightning.config.registry import unknown_name_message
from medseg_lightning.config.selection import check_selection_metric


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IntensityConfig(StrictModel):
    """Intensity normalisation of one modality (channel).

    ``zscore`` suits MRI (arbitrary units), ``ct_window`` suits CT (Hounsfield units have a meaning, so a fixed
    window is kept), ``percentile`` clips outliers then rescales to [0, 1].
    """

    method: Literal["zscore", "percentile", "ct_window", "minmax", "none"] = Field(
        "zscore", description="zscore (per case; MRI), percentile (clip, then scale to [0, 1]), ct_window (a fixed "
        "window in HU, scaled to [0, 1]; CT), minmax (scale to [0, 1]) or none")
    window: tuple[float, float] | None = Field(None, description="ct_window: lower and upper value, e.g. [-100, 400]")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="percentile: clipping percentiles")
    nonzero_only: bool = Field(False, description="zscore: statistics over non-zero voxels only (skull-stripped MRI)")

    @model_validator(mode="after")
    def _check_method_arguments(self) -> IntensityConfig:
        if self.method == "ct_window" and self.window is None:
            raise ValueError("method 'ct_window' needs 'window: [lower, upper]'")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"window lower {self.window[0]} must be below upper {self.window[1]}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(self.percentiles)}")
        return self


class PreprocessConfig(StrictModel):
    """Per-case preprocessing, computed once and cached."""

    intensity: IntensityConfig | list[IntensityConfig] = Field(
        default_factory=IntensityConfig, description="one setting for every channel, or a list with one per channel"
    )
    target_size: tuple[int, int] | None = Field(
        None, description="in-plane size (rows, cols) of every slice; null keeps the native size (needs equal shapes)"
    )
    resize_mode: Literal["pad_crop", "resize"] = Field(
        "pad_crop", description="pad_crop keeps the voxel spacing (centre pad/crop); resize interpolates"
    )

    @model_validator(mode="after")
    def _check_size(self) -> PreprocessConfig:
        if self.target_size is not None and min(self.target_size) < 1:
            raise ValueError(f"target_size must be positive, got {list(self.target_size)}")
        return self

    def intensity_for(self, n_channels: int) -> list[IntensityConfig]:
        """The intensity setting of each channel; a single setting applies to all."""
        if isinstance(self.intensity, IntensityConfig):
            return [self.intensity] * n_channels
        if len(self.intensity) != n_channels:
            raise ValueError(f"preprocessing.intensity lists {len(self.intensity)} settings for {n_channels} channels")
        return list(self.intensity)


class SlicingConfig(StrictModel):
    """How volumes become 2D (or 2.5D) training samples."""

    axis: Literal[0, 1, 2] = Field(2, description="voxel axis (after canonical RAS reorientation) to slice along")
    context: int = Field(0, ge=0, description="neighbouring slices on each side stacked as channels (2.5D)")
    background_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="share of background-only training slices drawn each epoch"
    )


class SplitConfig(StrictModel):
    """Subject-level train/val/test split: cases of one subject never land in two splits."""

    method: Literal["kfold", "file", "leave_group_out"] = Field(
        "kfold", description="kfold: folds over subjects; file: the split read from a CSV (file); leave_group_out: "
        "test = every subject of one group (held_out_group of group_attribute), val = val_fraction of the others")
    n_folds: int = Field(5, ge=2, description="kfold: number of folds over subjects")
    fold: int = Field(0, ge=0, description="kfold: the held-out fold")
    holdout: Literal["val", "test"] = Field("val", description="the role of the held-out fold")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="holdout=test: share of the rest used for val")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="holdout=val: share of subjects kept for test")
    stratify_by: str | None = Field(None, description="attribute column whose groups are spread evenly over folds")
    seed: int = Field(0, description="the same seed always gives the same split")
    file: Path | None = Field(None, description="method=file: CSV with columns subject_id (or case_id) and split")
    group_attribute: str | None = Field(None, description="leave_group_out: the attribute, e.g. site")
    held_out_group: str | None = Field(None, description="leave_group_out: its value whose subjects are the test set")

    @model_validator(mode="after")
    def _check_fold(self) -> SplitConfig:
        if self.method == "leave_group_out" and (self.group_attribute is None or self.held_out_group is None):
            raise ValueError("method 'leave_group_out' needs 'group_attribute' and 'held_out_group'")
        if self.method == "kfold" and self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} must be below n_folds {self.n_folds}")
        if self.method == "file" and self.file is None:
            raise ValueError("method 'file' needs 'file: path/to/splits.csv'")
        return self


class AugmentationConfig(StrictModel):
    """Training augmentation: a named preset plus transforms listed by albumentations class name."""

    preset: str = Field("light", description="none, light, strong or intensity")
    transforms: list[dict[str, Any]] = Field(
        default_factory=list, description="extra transforms, e.g. [{name: GaussNoise, p: 0.2}]"
    )


class LoaderConfig(StrictModel):
    """DataLoader settings."""

    batch_size: int = Field(16, ge=1, description="training slices per batch")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    pin_memory: bool | None = Field(None, description="null: pin when a GPU is present")
    persistent_workers: bool = Field(True, description="keep the DataLoader workers alive between epochs")


class AttributeColumn(StrictModel):
    """One attribute read from a column of the attribute table, with its codes translated."""

    column: str = Field(description="the table's column, e.g. gender")
    codes: dict[int | str, str] | None = Field(
        None, description="code -> label, e.g. {1: F, 2: M}; a code not listed is a data-check error; null keeps values"
    )


class AttributesConfig(StrictModel):
    """Patient attributes from a table joined on a key taken from the case id, and from the case id itself."""

    table: Path | None = Field(None, description="CSV with one row per patient (relative to this file)")
    key_column: str | None = Field(None, description="the table's key column, e.g. Patient")
    case_key: str = Field("^(.*)$", description="regex on the case id whose first group is the key")
    columns: dict[str, AttributeColumn] = Field(default_factory=dict, description="attribute name -> column")
    from_case_id: dict[str, str] = Field(
        default_factory=dict, description="attribute name -> regex on the case id whose first group is the value"
    )

    @model_validator(mode="after")
    def _check(self) -> AttributesConfig:
        if self.columns and (self.table is None or self.key_column is None):
            raise ValueError("attribute columns need 'table' and 'key_column'")
        for name, pattern in {"case_key": self.case_key, **self.from_case_id}.items():
            try:
                if re.compile(pattern).groups < 1:
                    raise ValueError(f"{name}: regex {pattern!r} needs a group, e.g. ^TCGA_([A-Z0-9]{{2}})_")
            except re.error as error:
                raise ValueError(f"{name}: invalid regex {pattern!r}: {error}") from None
        return self


class InstancesConfig(StrictModel):
    """``task: instance``: where the objects come from; each object's class is the mask's label under it."""

    source: Literal["components", "column"] = Field(
        "components", description="components: connected components of each class of the mask; column: a manifest "
                                  "column holding instance-label maps (one integer per object, 0 = none)")
    column: str = Field("instances", description="source=column: the manifest column of the instance-label maps")
    connectivity: Literal[1, 2, 3] = Field(1, description="components: 1 = faces, 2 = and edges, 3 = and corners")
    min_size: int = Field(1, ge=1, description="objects with fewer voxels are not objects (noise, annotation specks)")


class DataConfig(StrictModel):
    """Where the cases are and how they become batches."""

    source: Path = Field(description="a manifest CSV, or a dataset folder (MSD imagesTr/labelsTr, images/masks)")
    image_columns: list[str] = Field(default_factory=lambda: ["image"], description="one column per modality")
    mask_column: str = Field("mask", description="the manifest column holding the label map")
    labels: dict[int, str] = Field(default_factory=lambda: {0: "background", 1: "foreground"},
                                   description="class names, numbered 0..N-1 (0 = background)")
    label_mapping: dict[int, int] = Field(default_factory=dict, description="mask value -> label, e.g. {255: 1}")
    slicing: SlicingConfig = Field(default_factory=SlicingConfig, description="volumes into 2D or 2.5D slices")
    preprocessing: PreprocessConfig = Field(default_factory=PreprocessConfig,
                                            description="intensity normalisation and in-plane size, cached")
    split: SplitConfig = Field(default_factory=SplitConfig, description="the subject-level train/val/test split")
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig,
                                             description="training augmentation")
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="DataLoader settings")
    cache_dir: Path | None = Field(None, description="preprocessing cache; null: $MEDSEG_CACHE_DIR or ./.medseg_cache")
    attributes: AttributesConfig | None = Field(None, description="attributes from a table and from case ids")
    instances: InstancesConfig | None = Field(None, description="task: instance: where the objects come from")

    @property
    def file_columns(self) -> list[str]:
        """Manifest columns of further files a case needs (instance-label maps)."""
        return [self.instances.column] if self.instances is not None and self.instances.source == "column" else []

    @model_validator(mode="after")
    def _check_labels(self) -> DataConfig:
        if sorted(self.labels) != list(range(len(self.labels))) or len(self.labels) < 2:
            raise ValueError(f"labels must be numbered 0..N-1 with N >= 2 (0 = background), got {sorted(self.labels)}")
        unknown = sorted(set(self.label_mapping.values()) - set(self.labels))
        if unknown:
            raise ValueError(f"label_mapping maps to {unknown}, which are not in labels {sorted(self.labels)}")
        if not self.image_columns:
            raise ValueError("image_columns must name at least one column")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class _NetworkConfig(StrictModel):
    """What every network has: a timm encoder, where its weights come from, how it is fine-tuned."""

    arch: str = Field(description="the network's architecture")  # each kind narrows it; declared here to come first
    encoder: str = Field("resnet18", description="any timm model name usable with features_only")
    pretrained: str = Field(
        "none", description="none, timm (hub or local HF cache), a .safetensors/.pth file, runs:/ID or models:/NAME/V"
    )
    encoder_freeze_epochs: int = Field(0, ge=0, description="epochs with a frozen encoder (BatchNorm statistics too)")
    encoder_lr_multiplier: float = Field(1.0, gt=0, description="encoder learning rate = lr x this")


class DecoderModelConfig(_NetworkConfig):
    """A registered decoder architecture (unet, fcn, segnet, ...) on the encoder: a label per pixel."""

    arch: str = Field("unet", description="decoder architecture: unet, fcn, segnet, ... (mask_rcnn: see below)")
    decoder_channels: list[int] | None = Field(None, description="decoder widths; null derives them from the encoder")
    size_mismatch: Literal["pad", "error"] = Field(
        "pad", description="inputs not divisible by the encoder stride: pad and crop back, or raise"
    )
    head_dropout: float | None = Field(
        None, gt=0, lt=1, description="Dropout2d rate on the decoder output, before the 1x1 head: regularises, and "
        "lets medseg predict --mc-dropout N sample it at inference (Monte-Carlo dropout); null: none")


class MaskRCNNModelConfig(_NetworkConfig):
    """Mask R-CNN on the encoder's feature pyramid: separate objects (``task: instance``)."""

    arch: Literal["mask_rcnn"] = Field(description="mask_rcnn: torchvision's Mask R-CNN heads on the encoder")
    anchor_sizes: list[int] | None = Field(
        None, description="anchor size (pixels) per pyramid level (5); null: from the training objects")
    fpn_channels: int = Field(256, ge=8, description="feature pyramid width")
    detections_per_image: int = Field(100, ge=1, description="most objects kept per slice")
    score_threshold: float = Field(0.5, ge=0, le=1, description="detections below this score are dropped")


def _model_kind(value: Any) -> str:
    """The union's tag from ``arch``: the decoder architectures are an open registry, so no Literal can list them."""
    arch = value.get("arch", "unet") if isinstance(value, dict) else getattr(value, "arch", "unet")
    return "mask_rcnn" if arch == "mask_rcnn" else "decoder"


# The model section: a U-Net config cannot carry detector fields, nor a Mask R-CNN one decoder fields.
ModelConfig = Annotated[
    Annotated[DecoderModelConfig, Tag("decoder")] | Annotated[MaskRCNNModelConfig, Tag("mask_rcnn")],
    Discriminator(_model_kind),
]

# Before the union, one model section carried every field (in this order, with these defaults) for every model.
# Models logged then hold all of them in their model.yaml, and the config and study hashes were computed over
# them: ``_drop_unused_defaults`` keeps those files loadable, ``hashed_model_settings`` those hashes unchanged.
_SINGLE_SECTION_DEFAULTS: dict[str, Any] = {
    "arch": "unet", "encoder": "resnet18", "pretrained": "none", "decoder_channels": None, "size_mismatch": "pad",
    "encoder_freeze_epochs": 0, "encoder_lr_multiplier": 1.0, "anchor_sizes": None, "fpn_channels": 256,
    "detections_per_image": 100, "score_threshold": 0.5,
}


def _variant(kind: str) -> type[_NetworkConfig]:
    return MaskRCNNModelConfig if kind == "mask_rcnn" else DecoderModelConfig


def inherited_model_fields(inherited: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """What a file or ``--set`` that sets ``update`` keeps of the model section before it: everything, except
    that an ``arch`` of the other kind (unet on a mask_rcnn base) does not inherit the old kind's own fields."""
    new_kind = _model_kind(update)
    if "arch" not in update or new_kind == _model_kind(inherited):
        return inherited
    own = set(_variant(new_kind).model_fields)
    return {key: value for key, value in inherited.items() if key in own}


def _drop_unused_defaults(model: Any) -> Any:
    """The model section without the other kind's fields where they hold the single section's defaults (what a
    model logged before the union wrote); any other value of such a field is refused, saying whose field it is."""
    if not isinstance(model, dict):
        return model
    kind = _model_kind(model)
    unused = set(_SINGLE_SECTION_DEFAULTS) - set(_variant(kind).model_fields)
    misplaced = sorted(key for key in unused & set(model) if model[key] != _SINGLE_SECTION_DEFAULTS[key])
    if misplaced:
        owner = "decoder architectures (unet, fcn, segnet, ...)" if kind == "mask_rcnn" else "arch mask_rcnn"
        raise ValueError(f"{', '.join(misplaced)}: only for {owner}; this model's arch is "
                         f"{model.get('arch', 'unet')!r}")
    return {key: value for key, value in model.items() if key not in unused}


def hashed_model_settings(model: DecoderModelConfig | MaskRCNNModelConfig) -> dict[str, Any]:
    """The model section as the config hashes see it: the single section's fields in its order (the other kind's
    at their defaults), then any field added since, so that every earlier hash stays what it was."""
    dumped = model.model_dump(mode="json")
    return ({key: dumped.get(key, default) for key, default in _SINGLE_SECTION_DEFAULTS.items()}
            | {key: value for key, value in dumped.items() if key not in _SINGLE_SECTION_DEFAULTS})


class LossConfig(StrictModel):
    """Training loss chosen by name."""

    name: str = Field("dice_ce", description="ce, dice, dice_ce, focal, tversky")
    class_weights: list[float] | None = Field(None, description="one weight per class, background included")
    params: dict[str, Any] = Field(default_factory=dict, description="loss-specific settings, e.g. {gamma: 2}")


class OptimizerConfig(StrictModel):
    """Optimiser and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (Nesterov momentum)")
    lr: float = Field(1e-3, gt=0, description="learning rate (the encoder's: x model.encoder_lr_multiplier)")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    momentum: float = Field(0.99, ge=0, lt=1, description="sgd only (Nesterov, as nnU-Net)")
    scheduler: Literal["none", "cosine", "poly", "onecycle"] = Field(
        "cosine", description="learning-rate schedule, stepped every batch")
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up before the schedule (not with onecycle)")
    poly_power: float = Field(0.9, gt=0, description="poly: the exponent of the schedule")


class TrainerConfig(StrictModel):
    """Lightning Trainer settings; the defaults run anywhere (CPU or GPU)."""

    max_epochs: int = Field(50, ge=1, description="training epochs")
    accelerator: str = Field("auto", description="auto, cpu, gpu, mps")
    devices: int | str | list[int] = Field("auto", description="number, list of ids, or auto")
    strategy: str = Field("auto", description="auto, ddp, ddp_spawn, ...")
    num_nodes: int = Field(1, ge=1, description="machines of one distributed run (DDP)")
    precision: str = Field("32-true", description="32-true, 16-mixed, bf16-mixed, or auto: bf16-mixed where the "
                           "hardware computes in bfloat16 (recent GPUs; CPUs with AVX512-BF16 or AMX), else 32-true")
    compile: bool = Field(False, description="torch.compile the network for training steps (validation, test and "
                          "the logged model use the same weights, uncompiled); the first steps pay the compilation")
    gradient_clip_val: float | None = Field(None, gt=0, description="clip gradients to this norm; null: off")
    accumulate_grad_batches: int = Field(1, ge=1, description="batches whose gradients add up to one step")
    deterministic: bool = Field(False, description="deterministic algorithms only (Lightning's deterministic)")
    limit_train_batches: float | int = Field(1.0, description="fraction or number of training batches per epoch")
    check_val_every_n_epoch: int = Field(1, ge=1, description="validate every this many epochs")
    log_every_n_steps: int = Field(10, ge=1, description="training metrics logged every this many steps")
    monitor: str = Field("val/dice", description="validation metric for checkpointing and early stopping (a test/ "
                         "metric is refused: test must not choose the model)")
    monitor_mode: Literal["max", "min"] = Field("max", description="whether a higher or lower monitor is better")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs without improvement; null: off")
    inference_batch_size: int = Field(64, ge=1, description="slices per forward pass at validation and test")
    channels_last: bool = Field(False, description="channels-last memory format for the network and its inputs")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="validate, checkpoint and ship an exponential moving average of the weights "
        "(over about 1 / (1 - decay) steps, BatchNorm statistics too); null: the weights as trained")
    keep_checkpoints: Literal["none", "last", "best", "both"] = Field(
        "none", description="local checkpoints kept once a run has finished (a run that failed or was interrupted "
        "always keeps its last one, to resume from); the logged model holds the weights either way")
    evaluate_test: bool = Field(
        True, description="test the best model at the end of training; false for tuning (development mode: the "
        "test split is never looked at; evaluate it once at the end with medseg evaluate --split test)")

    @model_validator(mode="after")
    def _check_monitor(self) -> TrainerConfig:
        check_selection_metric(self.monitor, "trainer.monitor")
        return self


class TrackingConfig(StrictModel):
    """Where runs are recorded (MLflow)."""

    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db with artifacts in mlruns/"
    )
    experiment_name: str | None = Field(None, description="null: the experiment's name")
    run_name: str | None = Field(None, description="null: <experiment>-<date>-<time>")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags of the run")
    log_overlays: int = Field(4, ge=0, description="prediction overlay PNGs per validation epoch")
    log_saliency: bool = Field(True, description="log Grad-CAM and integrated-gradients maps of the best and worst "
                               "evaluated case (metrics/<split>_saliency.png), named in the model card")
    log_model: bool = Field(True, description="log the trained model (safetensors weights + config) in MLflow")
    log_checkpoint: Literal["none", "weights", "full"] = Field(
        "none", description="copy of the best checkpoint among the run's artifacts: none, weights (no optimiser "
        "state), full (resumable elsewhere; about 3x the weights for Adam)")


class FairnessConfig(StrictModel):
    """Which patient attributes to audit, and how: per-group metrics with bootstrap intervals, gaps, caveats."""

    attributes: list[str] = Field(default_factory=list, description="manifest columns to audit, e.g. [sex, age, site]")
    bins: dict[str, list[float]] = Field(
        default_factory=dict, description="edges for continuous attributes, e.g. {age: [0, 40, 60, 120]}"
    )
    min_group_size: int = Field(10, ge=1, description="smaller groups are reported as too small to measure")
    n_bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for confidence intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of every confidence interval")
    gap_threshold: float = Field(0.05, ge=0.0, description="a Dice gap above this becomes a model-card caveat")
    seed: int = Field(0, description="seed of the bootstrap, so reruns give the same intervals")

    @model_validator(mode="after")
    def _check_bins(self) -> FairnessConfig:
        for name, edges in self.bins.items():
            if name not in self.attributes:
                raise ValueError(f"bins for {name!r}, which is not in attributes {self.attributes}")
            if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"bins for {name!r} must be at least 2 increasing edges, got {edges}")
        return self


class ModelCardConfig(StrictModel):
    """What only the model's authors can say (Mitchell et al. 2019); the numbers are filled in from the run."""

    model_name: str | None = Field(None, description="null: the experiment's name")
    version: str | None = Field(None, description="null: the MLflow run id")
    owners: list[str] = Field(default_factory=list, description="people or team to contact")
    license: str = Field("unspecified", description="licence of the model weights, e.g. CC-BY-4.0")
    intended_use: str = Field("", description="primary intended uses and users")
    out_of_scope_uses: list[str] = Field(default_factory=list, description="uses the model must not be put to")
    ethical_considerations: list[str] = Field(default_factory=list, description="sentences copied into the card")
    caveats: list[str] = Field(default_factory=list, description="known limitations, added to the generated ones")
    recommendations: list[str] = Field(default_factory=list, description="sentences copied into the card")
    min_test_cases: int = Field(30, ge=1, description="fewer evaluation cases than this becomes a caveat")


class InferenceConfig(StrictModel):
    """How ``medseg predict`` post-processes this model's output; saved with the model, so it travels with it."""

    tta: bool = Field(False, description="average the predictions of the slice and its flips")
    largest_component: bool | list[str] = Field(
        False, description="keep only the largest connected component: true for every class, or a list of class names"
    )
    temperature: float | None = Field(
        None, gt=0, description="softmax temperature: logits are divided by it before every softmax (confidences, "
        "uncertainty maps, averaged members); fitted on validation by medseg calibrate; null is 1")


class PromotionConfig(StrictModel):
    """Gates a run must pass before ``medseg promote`` registers its model (command-line gates override these)."""

    split: Literal["test", "val"] = Field("test", description="the split whose metrics the gates read")
    min_dice: float | None = Field(None, ge=0, le=1, description="minimum mean case Dice")
    min_class_dice: dict[str, float] = Field(default_factory=dict, description="class name -> minimum Dice")
    max_fairness_gap: dict[str, float] = Field(default_factory=dict, description="attribute -> maximum Dice gap")
    min_cases: int | None = Field(None, ge=1, description="minimum number of evaluated cases")
    require_all_groups_measured: bool = Field(False, description="refuse when a group was too small to measure")


class ExperimentConfig(StrictModel):
    """One experiment: what ``medseg`` commands read from ``experiments/*.yaml``."""

    name: str = Field(description="experiment name (the MLflow experiment)")
    description: str = Field("", description="free text about the experiment")
    seed: int = Field(42, description="weights, sampling order and augmentations (a stream per DataLoader worker "
                      "and epoch derived from it)")
    task: str = Field(
        "semantic", description="semantic: a label per pixel; instance: separate objects (arch: mask_rcnn); or a "
        "task another package registers (see config/tasks.py)")
    data: DataConfig = Field(description="the cases, their split and how they become batches")
    model: ModelConfig = Field(default_factory=DecoderModelConfig,
                               description="the network; its fields depend on arch (a decoder or mask_rcnn)")
    loss: LossConfig = Field(default_factory=LossConfig, description="the training loss")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="optimiser and schedule")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Lightning Trainer settings")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    fairness: FairnessConfig = Field(default_factory=FairnessConfig, description="the per-group audit")
    model_card: ModelCardConfig = Field(default_factory=ModelCardConfig, description="the model card's texts")
    inference: InferenceConfig = Field(default_factory=InferenceConfig,
                                       description="post-processing, saved with the model")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="gates of medseg promote")

    @field_validator("model", mode="before")
    @classmethod
    def _model_fields_of_its_kind(cls, value: Any) -> Any:
        return _drop_unused_defaults(value)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from medseg_lightning.config.tasks import task_names

        if value not in task_names():
            raise ValueError(unknown_name_message("task", value, task_names()))
        return value

    @model_validator(mode="after")
    def _check_task(self) -> ExperimentConfig:
        if (self.task == "instance") != (self.model.arch == "mask_rcnn"):
            raise ValueError(f"task {self.task!r} with model.arch {self.model.arch!r}: instance segmentation uses "
                             "arch mask_rcnn, semantic segmentation a decoder (unet, fcn, segnet)")
        if self.task == "instance" and self.data.instances is None:
            self.data.instances = InstancesConfig()
        if self.task == "instance" and self.data.preprocessing.target_size is None:
            raise ValueError("task 'instance' needs data.preprocessing.target_size (Mask R-CNN's image size)")
        if self.task == "semantic" and "/instance/" in self.trainer.monitor:
            raise ValueError(f"trainer.monitor {self.trainer.monitor!r}: semantic runs log no instance metrics while "
                             "training (medseg evaluate scores their connected components); monitor val/dice")
        return self
