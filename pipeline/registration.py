"""Registration of a head image to the MNI template with SimpleITK (Mattes mutual information).

Transforms are returned (in a :class:`Registration`) as 4x4 RAS matrices that map *template* mm to
*patient* mm (ITK's fixed-to-moving convention with the template fixed), so a grid defined in template
space reaches patient space by one matrix product. SimpleITK works in LPS; conversion happens here and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the universal alias)
from scipy import ndimage

from pipeline.template import load_template

logger = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TEMPLATE_RESOLUTION_MM = 2  # fine enough for a head pose; 8x fewer voxels than 1 mm
FIXED_MASK_DILATION_MM = 10.0  # sample the brain and its rim, not the empty template background
# Brain sizes the affine fit starts from. From a single start at the template's size, mutual information
# often settled on the template brain stretched over the whole head of a small (x0.88) brain (brain mask
# Dice 0.76 against the phantom's). Each start is optimised at 8 mm; the winner is the one with the lowest
# metric over every voxel at 2 mm, unsmoothed: there the brain fit of a x0.88 brain scored -0.44..-0.48
# against -0.22..-0.26 for the head fits (three runs of two phantoms), while the 8 mm metrics the
# optimisations ended with were close (-0.69 vs -0.64; a `process` run that chose by them once ended with
# the head as brain mask).
SCALE_STARTS = (0.85, 1.0, 1.15)
# The starts compete at 8 mm with the metric over every voxel of the template's brain and rim (0.2 s a start).
# A random 25 % there (about 1,400 samples) made each start's end a lottery: from x1.15 a phantom's fit ended on
# the head in 2 of 3 seeds and on the brain in 1, while with every voxel the starts x0.75-1.15 all reached the
# same brain fit (6 phantoms; 20 of 30 start x phantom pairs good, against 56 of 90 sampled). A CI run once
# ended with the head as brain mask (Dice 0.68) on a phantom 150 local runs always placed.
COARSE_SHRINK = (4,)
FINE_SHRINK = (2, 1)  # the winner is refined at 4 and 2 mm on a random 25 % of the voxels
# SimpleITK reads a sampling seed of 0 as "seed from the wall clock", so the same series registered differently
# from run to run (one phantom's head pose error ranged 0.41-0.53 degrees over 14 runs). A fixed seed makes the
# maps reproducible.
SAMPLING_SEED = 1


_itk_threads_lock = threading.Lock()
_itk_single_users = 0  # registrations running now (the node's thread workers may run several at once)
_itk_saved_threads = 0


@contextmanager
def _single_threaded_itk() -> Iterator[None]:
    """ITK filters made inside run on one thread: the process-wide default, which is the only setting the
    metric's threads follow (``SetNumberOfThreads(1)`` on the registration object still left fits differing by
    up to 1e-4), set to 1 while any registration runs and restored when the last one ends.

    With two threads, three affine fits of one head with the same sampling seed differed by up to 0.004 (mm and
    matrix): the 8 mm fits' metric sums differ in the last bits (2e-6) from run to run and the optimiser's
    stopping amplifies that. On one thread the fits are identical, at about 1.2 s more per head (5.5 -> 6.7 s
    on a loaded 2-core machine).
    """
    global _itk_single_users, _itk_saved_threads
    with _itk_threads_lock:
        if _itk_single_users == 0:
            _itk_saved_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _itk_single_users += 1
    try:
        yield
    finally:
        with _itk_threads_lock:
            _itk_single_users -= 1
            if _itk_single_users == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_itk_saved_threads)


def to_sitk(data: np.ndarray, ras_affine: np.ndarray) -> sitk.Image:
    """A numpy volume (i, j, k) with its RAS affine as a SimpleITK image (LPS geometry)."""
    if data.ndim != 3:
        raise ValueError(f"data: expected a 3-D volume, got {data.ndim}-D")
    lps = LPS_FROM_RAS @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing < 1e-6):
        raise ValueError(f"ras_affine: a voxel axis has zero length: {ras_affine.tolist()}")
    directions = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data.astype(np.float32, copy=False), (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection(directions.ravel().tolist())
    return image


def _ras_matrix(transform: sitk.Euler3DTransform | sitk.AffineTransform) -> np.ndarray:
    """A SimpleITK matrix-and-offset transform (LPS, fixed to moving) as a 4x4 RAS matrix."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return LPS_FROM_RAS @ lps @ LPS_FROM_RAS


@dataclass(frozen=True)
class Registration:
    """A fixed-to-moving RAS transform (4x4) and the metric it reached (Mattes MI: lower is better)."""

    transform: np.ndarray
    metric: float


def register_images(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray, *,
                    kind: Literal["rigid", "affine"] = "rigid", initial: np.ndarray | None = None,
                    fixed_mask: np.ndarray | None = None, seed: int = SAMPLING_SEED,
                    sample_fraction: float | None = 0.25, shrink: tuple[int, ...] = (4, 2, 1)) -> Registration:
    """Fixed-to-moving RAS transform maximising Mattes mutual information (any two contrasts), and its metric.

    ``kind`` "rigid" (6 degrees of freedom) or "affine" (12). ``initial`` (4x4, fixed to moving) starts
    the search; without it the images' intensity moments do. ``fixed_mask`` limits the metric's samples;
    ``sample_fraction`` of them are drawn at random (by ``seed``, which must not be 0: SimpleITK reads 0 as the
    wall clock), or every one with ``None``.
    Multi-resolution: one level per ``shrink`` factor of the fixed grid, smoothed by as many mm; regular-step
    gradient descent with physical-shift scales.
    """
    if kind not in ("rigid", "affine"):
        raise ValueError(f"kind: expected 'rigid' or 'affine', got {kind!r}")
    if seed < 1:
        raise ValueError(f"seed: expected a positive integer (SimpleITK seeds 0 from the wall clock), got {seed}")
    fixed_image = to_sitk(fixed, fixed_affine)
    moving_image = sitk.Cast(to_sitk(moving, moving_affine), sitk.sitkFloat32)
    transform: sitk.Euler3DTransform | sitk.AffineTransform
    if initial is None:
        initial = moments_start(fixed_image, moving_image)
    transform = _sitk_transform(initial, kind, fixed.shape, fixed_affine)
    reg = _metric(fixed_mask, fixed_affine)
    if sample_fraction is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sample_fraction, seed)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([float(f) for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    with _single_threaded_itk():
        reg.Execute(fixed_image, moving_image)
    logger.debug("%s registration: metric %.4f after %d iterations (%s)", kind, reg.GetMetricValue(),
                 reg.GetOptimizerIteration(), reg.GetOptimizerStopConditionDescription())
    return Registration(_ras_matrix(transform), float(reg.GetMetricValue()))


def _sitk_transform(initial: np.ndarray, kind: str, fixed_shape: tuple[int, ...],
                   fixed_affine: np.ndarray) -> sitk.Euler3DTransform | sitk.AffineTransform:
    """A RAS fixed-to-moving 4x4 as an ITK transform centred on the fixed image (a rigid one: its rotation)."""
    lps = LPS_FROM_RAS @ initial @ LPS_FROM_RAS
    size = np.asarray(fixed_shape) - 1
    centre = (LPS_FROM_RAS @ fixed_affine @ np.append(size / 2, 1.0))[:3]
    transform = sitk.AffineTransform(3) if kind == "affine" else sitk.Euler3DTransform()
    transform.SetCenter(centre.tolist())
    transform.SetMatrix((lps[:3, :3] if kind == "affine" else nearest_rotation(lps[:3, :3])).ravel().tolist())
    transform.SetTranslation((lps[:3, 3] + lps[:3, :3] @ centre - centre).tolist())
    return transform


def _metric(fixed_mask: np.ndarray | None, fixed_affine: np.ndarray) -> sitk.ImageRegistrationMethod:
    """Mattes mutual information (32 bins, linear interpolation), sampled in ``fixed_mask`` if given."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.Cast(to_sitk(fixed_mask.astype(np.float32), fixed_affine) > 0.5, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def mutual_information(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                       transform: np.ndarray, *, fixed_mask: np.ndarray | None = None) -> float:
    """The Mattes metric (lower is better) of a fixed-to-moving RAS ``transform`` over every voxel of the fixed
    image (or of ``fixed_mask``), unsmoothed: deterministic, and sharper than the metric an optimisation at a
    coarse level ends with."""
    reg = _metric(fixed_mask, fixed_affine)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInitialTransform(_sitk_transform(transform, "affine", fixed.shape, fixed_affine))
    with _single_threaded_itk():
        return float(reg.MetricEvaluate(to_sitk(fixed, fixed_affine),
                                        sitk.Cast(to_sitk(moving, moving_affine), sitk.sitkFloat32)))


def moments_start(fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """The translation (4x4 RAS, fixed to moving) that puts the images' centres of intensity on each other
    (SimpleITK images, as :func:`to_sitk` makes them)."""
    found = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    return _ras_matrix(sitk.Euler3DTransform(found))


def register_to_template(image: np.ndarray, ras_affine: np.ndarray, *, kind: Literal["rigid", "affine"] = "rigid",
                         initial: np.ndarray | None = None, seed: int = SAMPLING_SEED,
                         sample_fraction: float | None = 0.25, shrink: tuple[int, ...] = (4, 2, 1)) -> Registration:
    """The template-to-patient RAS transform (4x4) that best aligns the MNI template with the head ``image``,
    and its metric.

    The template is skull-stripped: the metric samples the template's brain and a 10 mm rim, so the
    scalp of a real head does not pull the fit.
    """
    template = load_template(TEMPLATE_RESOLUTION_MM)
    return register_images(template.image, template.affine, image, ras_affine, kind=kind, initial=initial,
                           fixed_mask=_template_rim(), seed=seed, sample_fraction=sample_fraction, shrink=shrink)


@lru_cache(maxsize=1)
def _template_rim() -> np.ndarray:
    """The template's brain and a 10 mm rim: where the registration metric samples."""
    template = load_template(TEMPLATE_RESOLUTION_MM)
    return ndimage.binary_dilation(template.brain_mask > 0.5,
                                   iterations=int(np.ceil(FIXED_MASK_DILATION_MM / TEMPLATE_RESOLUTION_MM)))


def downsampled(image: np.ndarray, ras_affine: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` smoothed to about ``spacing_mm`` resolution (Gaussian of FWHM sqrt(spacing^2 - voxel^2)) and
    sampled every round(spacing / voxel) voxels per axis, with the RAS affine of that grid."""
    voxel = np.linalg.norm(ras_affine[:3, :3], axis=0)
    sigma_mm = np.sqrt(np.maximum(spacing_mm**2 - voxel**2, 0.0)) / (2 * np.sqrt(2 * np.log(2)))
    step = np.maximum(1, np.round(spacing_mm / voxel)).astype(int)
    smooth = ndimage.gaussian_filter(image.astype(np.float32, copy=False), sigma=sigma_mm / voxel)
    affine = ras_affine.copy()
    affine[:3, :3] = ras_affine[:3, :3] * step
    return np.ascontiguousarray(smooth[:: step[0], :: step[1], :: step[2]]), affine


def fit_template_affine(image: np.ndarray, ras_affine: np.ndarray) -> Registration:
    """The affine template-to-patient transform of the head ``image``: started at the head's centre with each
    brain size in :data:`SCALE_STARTS`, optimised at 8 mm on every voxel, and the best of them refined. The
    registration sees a copy of the head at the template's 2 mm (its finest level): 3-4x faster than the
    full-resolution head, which ITK smooths again for every level of every start (5 phantoms: brain mask Dice
    within 0.004, head pose within 0.15 degrees)."""
    image, ras_affine = downsampled(image, ras_affine, TEMPLATE_RESOLUTION_MM)
    template = load_template(TEMPLATE_RESOLUTION_MM)
    centre = moments_start(to_sitk(template.image, template.affine), to_sitk(image, ras_affine))
    pivot = template.brain_centre_mm
    starts = []
    for scale in SCALE_STARTS:
        scaling = np.eye(4)
        scaling[:3, :3] *= scale
        scaling[:3, 3] = pivot - scale * pivot
        starts.append(register_to_template(image, ras_affine, kind="affine", initial=centre @ scaling,
                                           sample_fraction=None, shrink=COARSE_SHRINK))
    def score(transform: np.ndarray) -> float:
        return mutual_information(template.image, template.affine, image, ras_affine, transform,
                                  fixed_mask=_template_rim())

    scores = [score(r.transform) for r in starts]
    best = starts[int(np.argmin(scores))]
    logger.debug("affine starts: metric at 8 mm / at 2 mm unsmoothed %s", ", ".join(
        f"x{s}: {r.metric:.3f} / {value:.3f}" for s, r, value in zip(SCALE_STARTS, starts, scores, strict=True)))
    refined = register_to_template(image, ras_affine, kind="affine", initial=best.transform, shrink=FINE_SHRINK)
    # Refinement improved the 2 mm score of all 15 phantoms tried (by 0.005-0.07); one that worsens it has left
    # the winner's basin, and the winner is the better fit.
    refined_score = score(refined.transform)
    if refined_score > min(scores):
        logger.warning("affine refinement worsened the fit (%.3f > %.3f at 2 mm): kept the 8 mm fit",
                       refined_score, min(scores))
        return best
    return refined


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation closest to the 3x3 matrix ``m`` (its polar factor, with determinant +1)."""
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r
