"""Blind deblurring with the L0 gradient prior (Pan et al. 2014; Anger, Facciolo & Delbracio 2019).

One uniform blur kernel per image is estimated coarse to fine on the
luminance, then every colour channel is deconvolved with it:

1. **Pyramid.** The luminance (a window of at most ``estimate_side`` pixels
   with the most edges, or ten kernel sides for a wide kernel) is downscaled
   by √2 per level until the kernel is about 3 px; the kernel of one level,
   resized, starts the next. The kernel window is 35 px unless set, or wider
   when a quick estimate at reduced resolution (the scout) measures a wider
   blur on an image large enough to tell (:func:`choose_kernel_side`).
2. **Latent step.** ``min_x ||k * x - y||² + λ ||∇x||_0`` by half-quadratic
   splitting (β doubling from 2λ to 1e5; hard thresholding of the gradients;
   a closed-form FFT solve per β). The padded margin is unknown data, refilled
   with the re-blurred estimate, so frame edges are not blur evidence.
3. **Kernel step.** ``min_k ||∇x * k - ∇y||² + γ ||k||²`` in closed form by
   FFT (γ relative to the latent's gradient energy), cut to the kernel
   window, then non-negativity, a threshold at the larger of 5% of the peak
   and 3× the estimate's own noise (read off its negative entries), removal
   of 8-connected components holding < 10% of the mass (components are kept
   by mass, not only the largest), centring and normalisation (the final
   kernel by the box of the central 96% of its mass, so a stray speck does
   not shift the output; that box is measured to a fraction of a pixel and
   the output is moved by the sub-pixel remainder the whole-pixel centring
   leaves, so it lines up with the input). λ starts at
   2e-3 on each level and decays ×0.9 per alternation (floor 1e-4); six
   alternations per level.
4. **Polish.** The kernel chosen among the candidates (step 6) gets eight
   more alternations at full resolution with a weak prior (λ 1e-4, up to
   2e-4 as the noise reaches 1 %, :func:`polish_weights`) and a
   weak kernel penalty (γ 0.05, down to 0.02 on nearly noise-free images,
   :func:`polish_penalty`). The pyramid's strong λ and γ keep the
   estimate on course but bias it: started from the true kernel, six
   alternations at λ 2e-3, γ 0.3 drift to 0.78 mean similarity with it, at
   λ 1e-4, γ 0.05 only to 0.92 (14 grey benchmark images); the polish lets
   the estimate settle where the bias is smaller (``polish=0`` skips it).
   On nearly clean photographs the polish takes the scene's edges as steps
   softened by a Gaussian of 0.4 px (``softness``; fading out as the noise
   rises to 0.5 %), so the kernel does not absorb that softness as width
   (:func:`polish_softness`);
   a JPEG-compressed image is polished at 4× the λ, so its latent does not
   take up the blocks.
   **Refit.** The L0 latent is piecewise flat: its edges are ideal steps, so
   the kernel fitted to it also absorbs the scene's own edge softness and
   comes out a fraction of a pixel too wide, which costs several dB once the
   noise is low. ``refit=N`` more rounds alternate the final step's TV restoration
   of the window (which keeps edge profiles and texture) with the kernel fitted
   by conjugate gradients to the pixels the kernel window fully covers, at a
   penalty set by the noise-to-signal ratio; images too noisy or flat for it
   keep their kernel, and a refitted kernel must pass the guards (step 8) like
   any other (:func:`refit_kernels`). Four rounds by default (``refit=0``
   turns it off): on top of the softened polish above, +0.05 to +0.19 dB on
   the benchmark's sets and +0.07 to +0.29 on the learned models' (camera
   shake and defocus at 0.5 % noise), for about a third more time on a clean
   megapixel photograph.
5. **Final deconvolution** of each channel with an isotropic TV (default),
   hyper-Laplacian (α = 0.8) or Wiener prior, borders handled as unknown data
   (:mod:`models.deconv`), its weight proportional to the measured noise
   level unless given (a JPEG-compressed image, recognised by its 8×8 blocks,
   is taken as at least 0.4 % noisy: compression hides the noise from the
   estimator, :func:`noise_sigma`); colour images as luminance + chroma (YCbCr), the
   chroma with a 2.5× stronger prior. Images longer than ``final_tile`` (1,024)
   plus twice a context of two kernel sides are solved in overlapping tiles, each
   with that context around it, so memory stays bounded on large scans
   (:func:`tiled_deconvolution`).
6. **Candidates.** Three estimator variants run per image (the one above;
   the kernel step fitted by conjugate gradients to the observed pixels only,
   so the refilled margin does not pull the kernel back to its previous
   shape; the same with a doubled λ), and the kernel whose luminance
   restoration (at 2.5× the final step's prior weight), re-blurred, explains
   the input best is kept (``candidates=1`` runs only the first). The
   variants run together as one batch (:func:`estimate_variants`): on small
   photographs the pyramid's coarse levels cost mostly per-operation
   overhead, which one batch pays once.
7. **Clipped highlights.** Pixels at the top of the range in any channel
   (``saturation``, grown by a pixel) do not obey the blur model: a light
   smeared into a clipped streak recorded less light than fell on it. They
   are unknown data in every step, like the padded margin: the kernel is
   fitted to the pixels whose luminance is clean, and the final
   deconvolution leaves out only the clipped channels (an overexposed orange
   keeps its green and blue) and fills them in, no darker than white deep
   inside wide clipped areas.
8. **Guards.** Images that do not look blurred (no-reference blur measure) are
   returned untouched; sharp photographs otherwise yield small spurious
   kernels that damage them. A kernel estimate that changed shape at the last
   pyramid level, whose restoration re-blurred no longer explains the input
   within a few noise levels, or whose restoration lines up with the input
   far better at some shift than in place (a periodic texture lets a kernel
   sit a whole period off its middle), is not trusted: the candidate ranked next
   (step 6) is polished and tried in its place, and if none holds the image
   comes back unchanged and the metric ``kernel_fallback`` is 1. An image
   deconvolved in tiles (step 5) is judged on the one tile nearest the
   estimation window, and only the kernel that holds deconvolves the rest:
   a rejected candidate costs a tile, not a whole scan.
9. **Defocus discs.** A trusted estimate that already looks like a uniform
   disc (kernel agreement ≥ 0.8 with the disc that best explains the
   window) is replaced by that disc, its radius found to a tenth of a pixel
   by the marginal likelihood of the window's spectrum
   (:mod:`models.parametric_psf`), unless the disc explains the spectrum
   clearly worse than the free-form estimate. A free-form estimate of a
   defocus blur is ragged at its rim, which costs 0.5-6 dB against the disc;
   camera shake never looks enough like a disc to be replaced. The radius is
   the metric ``defocus_radius`` (0 when the estimate stays; ``defocus=0``
   turns this off).
10. **Light.** A shaking camera blurs light before its tone curve is applied,
   so in a real camera-shake photograph the stored values are not a
   convolution of the scene. ``light=linear`` takes the sRGB curve off
   first, restores in linear light and puts the curve back
   (:func:`restore_in_linear_light`); the default, ``encoded``, restores the
   stored values as they are, as synthetic benchmarks (and the learned
   refiners' training data) blur them. The wrong choice costs 1.7-3.5 dB
   on the benchmarks.

Measured on ``bench/bench_l0_blind.py`` (see ``bench/RESULTS.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import overload

import torch
import torch.nn.functional as F

from models.base import RestorationModel, Restored, concat_restored
from models.catalog import REGISTRY
from models.deconv import (
    centred_window,
    clipped_floor,
    fft_size,
    filter_fft,
    gaussian_otf,
    grad,
    grad_adjoint,
    gradient_otfs,
    image_mask,
    pad_margin,
    periodic_pad,
    psf2otf,
    sparse_deconv,
    unsaturated_mask,
    wiener,
)
from models.parametric_psf import SpectrumScorer, family_extent, family_kernel
from models.tiling import blend_ramp, tile_starts
from models.tone import LIGHT_CHOICES, REC601_LUMA, linear_to_srgb, srgb_to_linear

MAX_AUTO_KERNEL = 35  # the automatic kernel window unless the scout measures a larger blur
MAX_SCOUTED_KERNEL = 101  # the largest window the scout may choose (and the spec's maximum)
SCOUT_MIN_SIDE = 192  # the scout's reduced image keeps at least this many pixels on its short side
SCOUT_SWITCH = 38  # scouted blur extents (full-resolution pixels) above this enlarge the window ...
SCOUT_MARGIN = 1.25  # ... to this many times the extent
SCOUT_TRIM = 0.01  # share of the scouted kernel's mass ignored at each end when measuring its extent
WINDOW_PER_KERNEL = 10  # the estimation window is at least this many kernel sides wide
# A kept estimate must agree this well with its own previous pyramid level. It was 0.55 until 2026-12-06; the worst
# benchmark losses then agreed 0.57-0.62 and most good estimates 0.65 or more (bench/RESULTS.md, fifteenth session).
GUARD_MIN_AGREEMENT = 0.63
GUARD_MAX_RESIDUAL = 3.0
GUARD_MIN_CENTRED = 0.4  # restorations must correlate with their input at zero shift this well (see centring)
GUARD_NOISE_FLOOR = 0.005  # the regularised restoration never explains the input to better than this
# An estimate reaching within UNCONSTRAINED_FILL px of its window's side whose restoration has under
# UNCONSTRAINED_ALONG of its gradient energy in edges crossing the kernel's long axis is rejected: only those
# measure a blur's length (see unconstrained_length; on the benchmarks legitimate window-filling estimates
# read 0.28-0.36, the three candidates of the one such collapse 0.10-0.16)
UNCONSTRAINED_FILL = 6
UNCONSTRAINED_ALONG = 0.22
NO_BLUR_EXTENT = 2
NO_BLUR_EFFECT = 0.42
FLAT_RANGE = 2.0 / 255.0  # luminance within two 8-bit levels everywhere: nothing to estimate a kernel from
# Images whose short side is below this come back as they went in (blur_detected 0): a kernel at most a third of
# the side (5 px here) leaves too few pixels to estimate it from, and the blur measure's 11-px box needs room.
MIN_ESTIMATE_SIDE = 16
# An image the blur measure calls sharp is still estimated when the defocus disc that best explains its spectrum
# (searched up to GATE_SEARCH_RADIUS) has a radius of GATE_DISC_RADIUS px or more, and restored only if its
# estimate then gives way to a defocus disc. On 80 sharp crops (20 photographs, 0-2 % noise) the best disc was
# 0.7-1.8 px; the blur measure reads strong texture and noise as sharpness and passed over defocused bricks,
# gravel, grass and retinas (discs of 2-6 px). Free-form estimates of such images are not trusted: on a brick wall
# they passed the guard and lost 2-9 dB. See bench/RESULTS.md.
GATE_DISC_RADIUS = 2.5
GATE_SEARCH_RADIUS = 6.0
# 8e-4 at 1% RGB noise (σ of the luminance 0.0067). 0.3 was the best weight with one
# estimator; with the candidate selection kernels are trustworthy enough for a weaker prior.
AUTO_LAMBDA_PER_SIGMA = 0.12
BOX_TRIM = 0.02  # share of the kernel's mass ignored at each end when centring it by its box
CHROMA_WEIGHT = 2.5  # chroma prior weight / luminance prior weight in the final step
# The candidates' restorations are compared at a stronger prior than the output's: a weakly
# regularised, well-converged TV solve explains the input nearly as well with a wrong kernel.
SELECT_WEIGHT = 2.5
AUTO_LAMBDA_RANGE = (3e-4, 1e-2)
# Images whose differences are this much stronger across one 8-px grid than elsewhere are JPEG-compressed (80 blurred
# crops per setting without compression: at most 1.08; at quality 90 the median is 1.16-1.21, at 75 1.34-1.39), and
# their noise is taken as at least JPEG_NOISE_FLOOR: at quality 90 the estimator reads 1 % noise as 0.27 % and drops
# the final prior to its floor. See bench/RESULTS.md.
JPEG_BLOCKINESS = 1.1
JPEG_NOISE_FLOOR = 0.004
JPEG_POLISH_LAMBDA = 4.0  # the polish's L0 weight is this many times stronger on them (worst cases -1.55 -> -0.59 dB)
# The polish's kernel penalty γ per unit of the luminance noise σ, within this range: 0.05 at 0.5 % noise and
# above (the value tuned on the usual benchmark sets), 0.02 on nearly clean photographs, where the data pins the
# kernel down better than the penalty does (+0.2 to +0.45 dB at 0.1 % noise; at 1 % noise 0.02 costs 0.1 dB).
POLISH_GAMMA_PER_SIGMA = 10.0
POLISH_GAMMA_RANGE = (0.02, 0.05)
# The polish's latent steps are taken as softened by a Gaussian of POLISH_SOFTNESS px (the edge softness of natural
# photographs: optics, demosaicing, resampling), so the kernel step does not put that softness into the kernel.
# Full on nearly clean photographs (noise at or below the polish penalty's floor, 0.2 %), fading to none where the
# penalty is capped (0.5 %), where it made no difference. 0.4 px: +0.19 / +0.22 dB on the grey 0.1 % packaged /
# unseen sets (0.6 px +0.0, 0.8 px −0.2); see bench/RESULTS.md.
POLISH_SOFTNESS = 0.4
# The polish's L0 weight rises with the noise between polish_lambda and POLISH_LAMBDA_RISE times it (the rule and
# why: polish_weights): 1e-4 up to about 0.5 % noise, 2e-4 at 1 %. 2e-4 instead of 1e-4 gained +0.23 dB on the
# colour 1 % benchmark sets (seeds 0-3; losses beyond 0.5 dB 5 → 3) and, fixed at 2e-4, +0.15 / +0.03 dB on colour
# sets not used to choose it; on the grey 0.1 % sets only textured photographs, which read noisier, moved
# (bench/RESULTS.md, sixteenth session).
POLISH_LAMBDA_PER_SIGMA = 0.03
POLISH_LAMBDA_RISE = 2.0
# The refit's kernel penalty γ = REFIT_GAMMA_PER_NSR · σ² / e (σ the measured noise, e the TV restoration's mean
# squared gradient); images that would need more than REFIT_GAMMA_MAX (σ²/e > 0.01) are not refitted, and a
# refitted kernel whose restoration explains the input worse than the polished one's by more than
# REFIT_RESIDUAL_RISE is dropped; REFIT_CG conjugate-gradient iterations per kernel fit. See bench/RESULTS.md.
REFIT_GAMMA_PER_NSR = 50.0
REFIT_GAMMA_MAX = 0.5
REFIT_RESIDUAL_RISE = 1.03
REFIT_CG = 25
# A refit corrects the kernel's width, not its shape: one that leaves the polished kernel (agreement below
# REFIT_MIN_AGREEMENT) is dropped. On the grey 0.1 % benchmark's 53 refits the lowest agreement was 0.94; a 96-px
# crop blurred in linear light whose refit grew a 10-px kernel to 15 px (agreement 0.67) passed the guard and came
# out with 1.6 times the input's error. See bench/RESULTS.md.
REFIT_MIN_AGREEMENT = 0.9
# A candidate estimate is replaced, before it is restored and judged, by the defocus disc whose radius best
# explains the estimation window's spectrum (models.parametric_psf) when the estimate already looks like that
# disc (kernel agreement at least DEFOCUS_MIN_AGREEMENT) and the disc explains the spectrum at most
# DEFOCUS_MAX_DEFICIT nats per frequency worse than the estimate does. Only estimates that agree with a disc
# of their own second moment at least DEFOCUS_PRECHECK pay for the radius search. On 96 synthetic cases (discs
# of 1.5-6 px, Gaussians, camera shake; 0.2-2 % noise) no camera shake passed (the closest: agreement 0.82 at a
# deficit of 0.23); see bench/RESULTS.md.
DEFOCUS_MIN_AGREEMENT = 0.8
DEFOCUS_MAX_DEFICIT = 0.15
DEFOCUS_PRECHECK = 0.7
DEFOCUS_MIN_RADIUS = 1.0
DEFOCUS_SEARCH_REACH = 2.0  # radii up to this many times the estimate's own second-moment radius (+1 px) are tried
# Windows with more clipped pixels than this share are not read for a disc (1 % missed a defocused white suit).
DEFOCUS_MAX_CLIPPED = 0.05
# The final deconvolution of a large image runs in tiles (tiled_deconvolution): cores of FINAL_TILE px overlapping
# by FINAL_TILE_BLEND, each solved with a context of FINAL_TILE_CONTEXT_PER_KERNEL kernel sides (at least
# FINAL_TILE_MIN_CONTEXT px) around it. Solved whole, a 24-megapixel colour scan needed 8.1-8.3 GiB on top of
# its own size, in tiles 3.5-3.7 GiB, and less time; see bench/RESULTS.md.
FINAL_TILE = 1024
FINAL_TILE_BLEND = 32
FINAL_TILE_CONTEXT_PER_KERNEL = 2
FINAL_TILE_MIN_CONTEXT = 48
# Estimator variants tried per image, in order (kernel solver, initial λ as a multiple of
# the configured one). The first is the classic estimator; the others fit the kernel to
# the observed pixels only and start from a stronger prior. See bench/RESULTS.md.
CANDIDATES: tuple[tuple[str, float], ...] = (("fft", 1.0), ("masked", 1.0), ("masked", 2.0))


@dataclass(frozen=True)
class L0Settings:
    """Parameters of the method (see the module docstring for their roles)."""

    kernel: int = 0  # odd kernel side; 0 chooses one from the image size
    lam: float = 2e-3  # initial weight of the L0 gradient prior on each level
    lam_floor: float = 1e-4
    lam_decay: float = 0.9  # per alternation
    restart_lambda: bool = True  # restart λ on every level (False: one decay across all levels)
    iterations: int = 6  # alternations per pyramid level
    gamma: float = 0.3  # L2 penalty of the kernel step, relative to the latent gradient energy
    polish_iterations: int = 8  # alternations at full resolution with a weak prior and penalty, on the chosen kernel
    polish_lambda: float = 1e-4  # the polish's L0 weight on nearly clean photographs (see polish_weights)
    polish_lambda_per_sigma: float = POLISH_LAMBDA_PER_SIGMA  # ... rising with the noise; 0 = fixed at polish_lambda
    polish_gamma: float = 0.0  # > 0 fixes it; 0 = from the measured noise (polish_penalty)
    polish_softness: float = POLISH_SOFTNESS  # px of edge softness the polish assumes on clean photographs (0 = off)
    refit_iterations: int = 4  # > 0: after the polish, TV restoration / kernel fit rounds (refit_kernels); 0 = off
    refit_gamma_per_nsr: float = REFIT_GAMMA_PER_NSR
    kernel_cut: float = 0.05  # kernel entries below this share of the peak are cleared
    kernel_noise: float = 3.0  # ... and those below this many noise levels of the estimate
    select_edges: bool = False  # kernel step on the strongest latent edges only (Cho & Lee)
    finest_scale: float = 1.0  # stop the pyramid at this scale and upsample the kernel
    centre: str = "box"  # final kernel centred by the box of its central 96% of mass, or "centroid"
    subpixel: bool = True  # move the output by the sub-pixel remainder of that centring (False: whole pixels only)
    final: str = "tv"  # final deconvolution: tv, hyper or wiener
    final_lambda: float = 0.0  # its prior weight (the NSR for wiener); 0 = from the measured noise
    lambda_per_sigma: float = AUTO_LAMBDA_PER_SIGMA  # automatic final weight per unit of noise σ
    chroma_weight: float = CHROMA_WEIGHT  # > 0: deconvolve colour as YCbCr, chroma weight × this; 0: RGB
    estimate_side: int = 384  # the kernel is estimated on a window at most this big (512: +45% time, no better)
    guard: bool = True  # no-blur gate and collapse guard
    kernel_solver: str = "fft"  # kernel step: "fft" (whole padded domain) or "masked" (observed pixels only)
    candidates: int = 3  # estimates compared per image (1..len(CANDIDATES)); the one that explains the input best wins
    select_weight: float = SELECT_WEIGHT  # candidates are compared after a final step at this many times its prior weight
    cg_iterations: int = 15  # conjugate-gradient iterations of the masked kernel step
    beta_growth: float = 2.0  # factor by which the splitting weight β grows in the latent step
    saturation: float = 0.985  # values this bright are clipped: unknown data, channel by channel (0 = off)
    defocus: bool = True  # a disc-like estimate gives way to the disc that best explains the spectrum
    final_tile: int = FINAL_TILE  # larger images are deconvolved in tiles of this core side (0 = whole)
    light: str = "encoded"  # "linear": undo the sRGB tone curve before, re-apply it after (real camera shake)

    def kernel_side(self, height: int, width: int) -> int:
        """The odd kernel side for an image of this size: the configured one, or the automatic default.

        Neither exceeds a third of the image's short side. With ``kernel`` 0,
        :func:`choose_kernel_side` may enlarge the default for a wide blur.
        """
        fit = _fitting_side(height, width)
        if self.kernel <= 0:
            return min(MAX_AUTO_KERNEL, fit)
        return min(self.kernel | 1, fit)

    def window_side(self, kernel_side: int) -> int:
        """Side of the window the kernel is estimated on: ``estimate_side``, or more for a wide kernel."""
        return max(self.estimate_side, WINDOW_PER_KERNEL * kernel_side)


def _fitting_side(height: int, width: int) -> int:
    """The largest odd kernel side no more than a third of the image's short side (at least 3)."""
    third = min(height, width) // 3
    return max(3, third if third % 2 else third - 1)


# ---------------------------------------------------------------- estimation


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance of an (N, C, H, W) batch (Rec. 601 weights for RGB)."""
    if x.shape[1] == 3:
        weights = x.new_tensor(REC601_LUMA).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def l0_latent(
    y: torch.Tensor, mask: torch.Tensor, otf: torch.Tensor, lam: float | Sequence[float], beta_max: float = 1e5,
    growth: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharp image under the L0 gradient prior for a padded blurred ``y`` (N, 1, H, W).

    ``lam`` is the prior weight of every image, or a sequence of N weights,
    one per image: each image then runs its own β schedule (from twice its
    weight up to ``beta_max``), the steps it would run alone (alike up to
    float rounding), and an image whose schedule ends first keeps its result
    while the others go on. The schedules are laid out as tensors once, so a
    step copies nothing from the host.

    Returns the latent image and the observed image with its margin refilled
    by the latent re-blurred (both padded).
    """
    size = y.shape[-2:]
    dx, dy = gradient_otfs(size, y.device, y.dtype)
    grad2 = dx.abs() ** 2 + dy.abs() ** 2
    otf2 = otf.abs() ** 2
    otf_conj = otf.conj()
    kept, refilled = mask * y, 1 - mask  # loop invariants: the data, and where the margin is refilled
    weights = [float(lam)] if isinstance(lam, (int, float)) else [float(v) for v in lam]
    if len(set(weights)) == 1:
        weights = weights[:1]  # one schedule for the whole batch, in plain scalars
    schedules = [_beta_schedule(weight, beta_max, growth) for weight in weights]
    steps = max(len(schedule) for schedule in schedules)
    if len(schedules) > 1:
        # (steps, N); an image past the end of its schedule repeats its last values, which the mask ignores
        at = [[schedule[min(step, len(schedule) - 1)] if schedule else beta_max for schedule in schedules]
              for step in range(steps)]
        beta_table = y.new_tensor(at)
        threshold_table = y.new_tensor([[w / b for w, b in zip(weights, row, strict=True)] for row in at])
        running_table = torch.tensor([[step < len(schedule) for schedule in schedules] for step in range(steps)],
                                     device=y.device)
    observed, latent = y, y
    for step in range(steps):
        if len(schedules) == 1:
            beta: float | torch.Tensor = schedules[0][step]
            threshold: float | torch.Tensor = weights[0] / schedules[0][step]
        else:
            beta = beta_table[step].view(-1, 1, 1, 1)
            threshold = threshold_table[step].view(-1, 1, 1, 1)
        gx, gy = grad(latent)
        keep = (gx * gx + gy * gy) >= threshold
        numer = otf_conj * torch.fft.rfft2(observed) + beta * torch.fft.rfft2(grad_adjoint(gx * keep, gy * keep))
        spectrum = numer * torch.reciprocal(otf2 + beta * grad2)  # what numer / (...) computes, bit for bit, faster
        next_latent = torch.fft.irfft2(spectrum, s=size)
        next_observed = kept + refilled * torch.fft.irfft2(spectrum * otf, s=size)
        if all(step < len(schedule) for schedule in schedules):
            latent, observed = next_latent, next_observed
        else:  # images whose schedule has ended keep their result
            rows = running_table[step].view(-1, 1, 1, 1)
            latent = torch.where(rows, next_latent, latent)
            observed = torch.where(rows, next_observed, observed)
    return latent, observed


def _beta_schedule(lam: float, beta_max: float, growth: float) -> list[float]:
    """The splitting weights β of :func:`l0_latent` at prior weight ``lam``: 2λ, ×``growth``, below ``beta_max``."""
    betas, beta = [], 2.0 * lam
    while beta < beta_max:
        betas.append(beta)
        beta *= growth
    return betas


def strong_gradients(
    latent: torch.Tensor, mask: torch.Tensor, side: int, per_direction: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``latent`` with all but the strongest edges set to zero.

    Weak latent gradients are mostly noise and texture that the L0 step let
    through; fed to the kernel step they smear the kernel. As in Cho & Lee
    (2009) and Pan et al.'s code, the threshold is the largest magnitude that
    still leaves at least ``per_direction * side`` pixels in each of four
    edge-orientation bins (so every direction keeps evidence about the blur).
    """
    gx, gy = grad(latent)
    magnitude = gx * gx + gy * gy
    angle = torch.remainder(torch.atan2(gy, gx), math.pi)
    bins = (angle / (math.pi / 4)).long().clamp(max=3)
    inside = mask.bool().expand_as(magnitude)
    wanted = per_direction * side
    thresholds = []
    for i in range(latent.shape[0]):
        mag_i, bins_i, inside_i = magnitude[i, 0], bins[i, 0], inside[i, 0]
        per_bin = []
        for b in range(4):
            values = mag_i[inside_i & (bins_i == b)]
            if values.numel() == 0:
                continue
            kth = min(wanted, values.numel())
            per_bin.append(torch.topk(values, kth).values[-1])
        thresholds.append(torch.stack(per_bin).min() if per_bin else magnitude.new_zeros(()))
    threshold = torch.stack(thresholds).view(-1, 1, 1, 1)
    keep = magnitude >= threshold
    return gx * keep, gy * keep


def kernel_step(
    latent_grads: tuple[torch.Tensor, torch.Tensor], observed: torch.Tensor, side: int,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """Least-squares kernel in the gradient domain with an L2 penalty, by FFT.

    Solves ``min_k ||∇x * k - ∇y||² + γ ||k||²`` for latent gradients ``∇x`` and the
    observed image ``y``, with ``γ`` relative to the latent gradient energy
    (so the same value works at every pyramid level and image size; a
    (N, 1, 1, 1) tensor gives each image its own). Returns
    the raw (N, side, side) kernel (may be negative, not normalised).
    """
    lx, ly = latent_grads
    ox, oy = grad(observed)
    fl_x, fl_y = torch.fft.rfft2(lx), torch.fft.rfft2(ly)
    energy = (lx * lx + ly * ly).sum(dim=(-2, -1), keepdim=True)
    numer = fl_x.conj() * torch.fft.rfft2(ox) + fl_y.conj() * torch.fft.rfft2(oy)
    denom = fl_x.abs() ** 2 + fl_y.abs() ** 2 + gamma * energy
    full = torch.fft.irfft2(numer * torch.reciprocal(denom), s=observed.shape[-2:])
    return centred_window(full[:, 0], side)


def masked_kernel_step(
    latent_grads: tuple[torch.Tensor, torch.Tensor],
    observed: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    gamma: float | torch.Tensor,
    iterations: int = 15,
) -> torch.Tensor:
    """Kernel least squares over the observed pixels only, by conjugate gradients.

    Solves ``min_k Σ_valid (∇x * k - ∇y)² + γ E ||k||²`` with ``k`` confined to its
    ``side``×``side`` window (``start``, (N, side, side), is the warm start and sets
    the side). Unlike :func:`kernel_step`, the padded margin, which the latent
    step refills with the current estimate re-blurred, is not evidence here, so
    the fit is not pulled back towards the kernel it started from; and the
    window constraint is exact instead of a crop of an unconstrained solution.
    ``E`` is the latent gradient energy over the valid share of the domain, so
    ``γ`` means the same as in :func:`kernel_step` (and, as there, a
    (N, 1, 1, 1) tensor gives each image its own).
    """
    n, side, _ = start.shape
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.reshape(n, 1, 1)
    share = valid.flatten(1).mean(dim=1).view(-1, 1, 1) if valid.ndim == 4 else valid.mean()
    energy = sum((g * g).sum(dim=(-3, -2, -1)) for g in latent_grads).view(n, 1, 1) * share
    # only the valid pixels and the kernel's reach around them enter the sums: solve on that box
    region, size = _reach_box(valid, side // 2)
    observed_grads = [g[region] for g in grad(observed)]
    seen = _zero_fill(valid[region], size)  # the valid pixels, on the box's FFT grid
    spectra = [torch.fft.rfft2(g[region], s=size) for g in latent_grads]

    def forward(k: torch.Tensor) -> list[torch.Tensor]:
        otf = psf2otf(k[:, None], size)
        return [torch.fft.irfft2(f * otf, s=size) for f in spectra]

    conj = [f.conj() for f in spectra]

    def adjoint(images: list[torch.Tensor]) -> torch.Tensor:
        # summed as spectra: one inverse transform instead of one per gradient direction
        total = torch.fft.irfft2(sum(c * torch.fft.rfft2(im) for c, im in zip(conj, images, strict=True)), s=size)
        return centred_window(total[:, 0], side)

    def normal(k: torch.Tensor) -> torch.Tensor:
        return adjoint([seen * v for v in forward(k)]) + gamma * energy * k

    b = adjoint([seen * _zero_fill(g, size) for g in observed_grads])
    k = start.clone()
    residual = b - normal(k)
    direction = residual.clone()
    rs = (residual * residual).sum(dim=(1, 2), keepdim=True)
    for _ in range(iterations):
        product = normal(direction)
        step = rs / (direction * product).sum(dim=(1, 2), keepdim=True).clamp(min=1e-20)
        k = k + step * direction
        residual = residual - step * product
        rs_next = (residual * residual).sum(dim=(1, 2), keepdim=True)
        direction = residual + (rs_next / rs.clamp(min=1e-30)) * direction
        rs = rs_next
    return k


def _reach_box(valid: torch.Tensor, reach: int) -> tuple[tuple[object, slice, slice], tuple[int, int]]:
    """The index of the box around ``valid``'s pixels (any image's) widened by ``reach``, and its FFT size.

    A circular convolution on that box, zero-filled to the FFT size, equals
    the one on the whole domain at every valid pixel for kernels of radius
    ``reach``, as long as the widened box fits in the domain; along an axis
    where it does not, the whole axis is kept (and so is its circularity).
    """
    plane = valid.reshape(-1, *valid.shape[-2:]).amax(dim=0) > 0
    spans = []
    for axis, dim in ((1, -2), (0, -1)):
        length = valid.shape[dim]
        hit = torch.nonzero(plane.any(dim=axis)).flatten()
        if hit.numel() == 0:
            spans.append((0, length, length))
            continue
        start, stop = int(hit[0]) - reach, int(hit[-1]) + 1 + reach
        if start < 0 or stop > length:
            spans.append((0, length, length))
        else:
            spans.append((start, stop, min(fft_size(stop - start), length)))
    (top, bottom, height), (left, right, width) = spans
    return (..., slice(top, bottom), slice(left, right)), (height, width)


def _zero_fill(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``t`` (..., h, w) padded with zeros at the bottom and right to ``size``."""
    return F.pad(t, (0, size[1] - t.shape[-1], 0, size[0] - t.shape[-2]))


def erode_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask`` (H, W) or (N, 1, H, W) of 0/1 with ``radius`` pixels taken off every edge of its support."""
    if radius <= 0:
        return mask
    batch = mask if mask.ndim == 4 else mask[None, None]
    eroded = 1.0 - F.max_pool2d(1.0 - batch, 2 * radius + 1, stride=1, padding=radius)
    return eroded if mask.ndim == 4 else eroded[0, 0]


def connected_labels(support: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a boolean (N, h, w) map (0 = background)."""
    n, h, w = support.shape
    ids = torch.arange(1, h * w + 1, device=support.device, dtype=torch.float32).view(1, h, w)
    labels = torch.where(support, ids.expand(n, -1, -1), torch.zeros((), device=support.device))
    for _ in range(h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * support
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def prune_kernel(
    k: torch.Tensor, rel_threshold: float = 0.05, noise_threshold: float = 3.0, min_mass: float = 0.1
) -> torch.Tensor:
    """Non-negative, thresholded, speck-free, normalised version of raw kernels (N, h, w).

    Entries below ``rel_threshold`` of the peak, or below ``noise_threshold``
    times the noise of the estimate, are cleared. That noise is measured on the
    raw kernel's negative entries, which a true blur kernel does not have, so
    they show how much the observation noise scatters over the window.
    Components (8-connected) are kept by mass: any holding at least
    ``min_mass`` of the total survives, so a kernel broken into two strokes keeps both.
    """
    n, h, w = k.shape
    negative = k.clamp(max=0.0).flatten(1)
    count = (negative < 0).sum(dim=1).clamp(min=1)
    noise = torch.sqrt((negative**2).sum(dim=1) / count).view(n, 1, 1)
    k = k.clamp(min=0.0)
    peak = k.flatten(1).amax(dim=1).view(n, 1, 1)
    threshold = torch.maximum(rel_threshold * peak, noise_threshold * noise)
    k = torch.where(k >= threshold, k, torch.zeros_like(k))
    labels = connected_labels(k > 0)
    mass = torch.zeros(n, h * w + 1, device=k.device, dtype=k.dtype)
    mass.scatter_add_(1, labels.flatten(1), k.flatten(1))
    total = mass[:, 1:].sum(dim=1, keepdim=True).clamp(min=1e-12)
    keep = torch.gather(mass / total, 1, labels.flatten(1)).view(n, h, w) >= min_mass
    k = k * keep * (labels > 0)
    return normalise_kernel(k)


def normalise_kernel(k: torch.Tensor) -> torch.Tensor:
    """Kernels (N, h, w) scaled to sum 1; an all-zero kernel becomes a centred delta."""
    total = k.flatten(1).sum(dim=1).view(-1, 1, 1)
    delta = torch.zeros_like(k)
    delta[:, k.shape[1] // 2, k.shape[2] // 2] = 1.0
    return torch.where(total > 1e-12, k / total.clamp(min=1e-12), delta)


def centre_kernel(k: torch.Tensor, by: str = "centroid") -> torch.Tensor:
    """Shift each kernel by whole pixels so its centroid (or support box) sits in the middle.

    The box is that of the central 96% of the kernel's mass along each axis
    (see :func:`_trimmed_middle`), so stray specks do not move it.

    Blind deconvolution cannot tell a shifted kernel from a shifted image;
    centring fixes that ambiguity so the output stays aligned with the input.
    What whole pixels cannot remove is :func:`centre_offset`.
    """
    offset = centre_offset(k, by)
    out = torch.empty_like(k)
    for i in range(k.shape[0]):
        out[i] = _shift_no_wrap(k[i], round(float(offset[i, 0])), round(float(offset[i, 1])))
    return out


def centre_offset(k: torch.Tensor, by: str = "box") -> torch.Tensor:
    """(N, 2) sub-pixel distance (rows, columns) from each kernel's middle to its centre pixel.

    For a kernel already centred by :func:`centre_kernel` each entry is within
    half a pixel: the shift that would centre it exactly. Deconvolving with
    the kernel moved by ``d`` gives the restoration moved by ``-d``, so
    :func:`subpixel_shift` by ``-centre_offset`` does that without a second
    deconvolution (and without the blur that interpolating the kernel adds).
    """
    n, h, w = k.shape
    out = k.new_zeros(n, 2)
    for i in range(n):
        cy, cx = kernel_middle(k[i], by)
        out[i, 0], out[i, 1] = h // 2 - cy, w // 2 - cx
    return out


def kernel_middle(k: torch.Tensor, by: str = "box") -> tuple[float, float]:
    """(row, column) of a 2-D kernel's middle in pixels, to a fraction of a pixel.

    ``by="box"``: the middle of the box holding the central 96% of its mass
    (:func:`_trimmed_middle`); ``"centroid"``: its centre of mass. An
    all-zero kernel's middle is its centre pixel.
    """
    h, w = k.shape
    if float(k.sum()) <= 0:
        return float(h // 2), float(w // 2)
    rows, cols = k.sum(dim=1), k.sum(dim=0)
    if by == "box":
        return _trimmed_middle(rows), _trimmed_middle(cols)
    mass = k.sum()
    cy = float((rows * torch.arange(h, device=k.device, dtype=k.dtype)).sum() / mass)
    cx = float((cols * torch.arange(w, device=k.device, dtype=k.dtype)).sum() / mass)
    return cy, cx


def _trimmed_middle(profile: torch.Tensor, share: float = BOX_TRIM) -> float:
    """Middle of the range of a non-negative 1-D ``profile`` holding all but ``share`` of its mass at each end.

    A plain support box moves by pixels when one faint speck survives the
    pruning; trimming 2% of the mass at each end ignores such specks and
    still matches the box of a clean trajectory. Each pixel's mass is taken
    as spread evenly across it (pixel ``j`` covers ``j - 0.5`` to ``j + 0.5``),
    so the ends, and the middle, are found to a fraction of a pixel: a
    uniform stroke over pixels 2 to 8 has its middle at exactly 5.0.
    """
    values = profile.detach().double().cpu()
    cumulative = torch.cat([values.new_zeros(1), torch.cumsum(values, dim=0)]) / values.sum().clamp(min=1e-12)

    def position(level: float) -> float:
        j = int(torch.nonzero(cumulative >= level - 1e-12)[0])  # first edge at which the mass reaches `level`
        if j == 0:
            return -0.5
        below, above = float(cumulative[j - 1]), float(cumulative[j])
        return j - 1.5 + (level - below) / max(above - below, 1e-12)

    return (position(share) + position(1.0 - share)) / 2.0


def subpixel_shift(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) moved by ``offset`` (N, 2) pixels (rows, columns), fractions included.

    A phase ramp in the Fourier domain (band-limited interpolation: it does not
    blur, as bilinear interpolation would), on a copy padded to wrap around
    smoothly (:func:`periodic_pad`), so the frame's edges do not ring. The
    padded sides are odd, so there is no Nyquist frequency whose shift a real
    image cannot represent. Meant for shifts under a pixel; an offset of zero
    returns the image unchanged up to floating-point rounding.
    """
    n, c, h, w = x.shape
    margin = 16
    size = (fft_size(h + 2 * margin, odd=True), fft_size(w + 2 * margin, odd=True))
    padded = periodic_pad(x, margin, size)
    hp, wp = padded.shape[-2:]
    fy = torch.fft.fftfreq(hp, device=x.device, dtype=x.dtype).view(1, hp, 1)
    fx = torch.fft.rfftfreq(wp, device=x.device, dtype=x.dtype).view(1, 1, -1)
    dy, dx = offset[:, 0].view(n, 1, 1).to(x.dtype), offset[:, 1].view(n, 1, 1).to(x.dtype)
    phase = -2.0 * math.pi * (fy * dy + fx * dx)
    moved = filter_fft(padded, torch.polar(torch.ones_like(phase), phase)[:, None])
    return moved[..., margin:margin + h, margin:margin + w]


def _shift_no_wrap(k: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    """Shift a 2-D kernel by (sy, sx) pixels, dropping what leaves the window."""
    h, w = k.shape
    out = torch.zeros_like(k)
    ys0, ys1 = max(0, sy), min(h, h + sy)
    xs0, xs1 = max(0, sx), min(w, w + sx)
    out[ys0:ys1, xs0:xs1] = k[ys0 - sy:ys1 - sy, xs0 - sx:xs1 - sx]
    return out


def resize_kernel(k: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of kernels (N, h, w) to (N, side, side), non-negative and normalised."""
    if k.shape[-1] == side and k.shape[-2] == side:
        return k
    resized = F.interpolate(k[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return normalise_kernel(resized.clamp(min=0.0))


def pyramid_sides(kernel: int) -> list[tuple[float, int]]:
    """(scale, kernel side) per level, coarsest first, the scale shrinking by √2 per level."""
    levels = max(1, math.floor(math.log(kernel / 3.0) / math.log(math.sqrt(2.0))) + 1)
    out = []
    for i in range(levels):
        scale = math.sqrt(0.5) ** (levels - 1 - i)
        side = min(kernel, max(3, round(kernel * scale) | 1))
        out.append((scale, side))
    return out


def estimation_box(y: torch.Tensor, side: int, known: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the ``side``-pixel window of ``y`` (N, 1, H, W) with the most edge content.

    Candidate windows on a coarse grid are scored by the mean gradient
    magnitude over the pixels ``known`` (N, 1, H, W) keeps, so a window is not
    chosen for the edges of clipped highlights; the batch shares one window
    position (the best on average).
    """
    h, w = y.shape[-2:]
    if h <= side and w <= side:
        return 0, 0, h, w
    wh, ww = min(h, side), min(w, side)
    gx, gy = grad(y)
    magnitude = gx.abs() + gy.abs()
    if known is not None:
        magnitude = magnitude * erode_mask(known, 1)
    energy = magnitude[..., :-1, :-1].mean(dim=(0, 1))
    best, best_pos = -1.0, (0, 0)
    for top in torch.linspace(0, h - wh, 5).round().long().unique().tolist():
        for left in torch.linspace(0, w - ww, 5).round().long().unique().tolist():
            score = float(energy[top:top + wh - 1, left:left + ww - 1].mean())
            if score > best:
                best, best_pos = score, (top, left)
    return best_pos[0], best_pos[1], wh, ww


def estimation_crop(y: torch.Tensor, side: int, known: torch.Tensor | None = None,
                    box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The window of ``y`` (N, 1, H, W) that :func:`estimation_box` picks, and the same window of ``known``.

    ``box`` is that function's answer when the caller already has it.
    """
    top, left, wh, ww = estimation_box(y, side, known) if box is None else box
    region = (..., slice(top, top + wh), slice(left, left + ww))
    return y[region], None if known is None else known[region]


def estimation_window(y: torch.Tensor, side: int) -> torch.Tensor:
    """The window of ``y`` (N, 1, H, W) that :func:`estimation_box` picks."""
    return estimation_crop(y, side)[0]


def level_known(known: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A 0/1 data mask (N, 1, H, W) at another image ``size``: known only where every pixel it covers was.

    Downscaled images mix neighbouring pixels (antialiased), so a coarse pixel
    next to a clipped one is lost as well (one more pixel of erosion).
    """
    if tuple(known.shape[-2:]) == tuple(size):
        return known
    covered = F.interpolate(known, size=size, mode="area")
    return erode_mask((covered > 0.999).to(known.dtype), 1)


@dataclass(frozen=True)
class LevelProblem:
    """One pyramid level's padded luminance, ready for the alternation.

    ``padded`` (N, 1, H', W') is the level's image with a smooth periodic
    margin; ``mask`` is 1 over the image's own pixels ((H', W'), or
    (N, 1, H', W') when clipped pixels are excluded too); ``valid`` is
    ``mask`` eroded by one pixel (where forward differences see only real
    pixels); ``side`` is the level's odd kernel side.
    """

    padded: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    side: int

    @classmethod
    def build(cls, y: torch.Tensor, side: int, known: torch.Tensor | None = None) -> LevelProblem:
        """The problem for luminance ``y`` (N, 1, H, W) and a kernel of ``side`` pixels.

        ``known`` (N, 1, H, W) at ``y``'s size or larger marks the pixels that are data (see
        :func:`level_known`); ``None`` means all of them.
        """
        size = (y.shape[-2], y.shape[-1])
        margin = pad_margin(side)
        padded_size = (fft_size(size[0] + 2 * margin), fft_size(size[1] + 2 * margin))
        padded = periodic_pad(y, margin, padded_size)
        mask = image_mask(padded, margin, size, None if known is None else level_known(known, size))
        return cls(padded, mask, erode_mask(mask, 1), side)

    def repeated(self, times: int) -> LevelProblem:
        """The same problem for the batch repeated ``times`` times (image ``i`` of copy ``c`` is row ``c·N + i``)."""
        if times == 1:
            return self
        return LevelProblem(repeat_batch(self.padded, times), repeat_batch(self.mask, times),
                            repeat_batch(self.valid, times), self.side)


@overload
def repeat_batch(t: torch.Tensor, times: int) -> torch.Tensor: ...


@overload
def repeat_batch(t: None, times: int) -> None: ...


def repeat_batch(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    """A batch tensor (N, C, H, W) repeated ``times`` times along N (row ``c·N + i`` is image ``i``).

    ``None`` and tensors of other ranks, which the whole batch shares (a
    (H, W) mask), come back as they are.
    """
    return t.repeat(times, 1, 1, 1) if t is not None and t.ndim == 4 and times > 1 else t


def alternate(problem: LevelProblem, k: torch.Tensor, settings: L0Settings, lam: float | Sequence[float],
              gamma: float | torch.Tensor, rounds: int, decay: float = 1.0, softness: torch.Tensor | None = None,
              solvers: Sequence[str] | None = None) -> tuple[torch.Tensor, list[float]]:
    """``rounds`` latent/kernel alternations from kernels ``k`` (N, side, side).

    Each round solves the L0 latent image at weight ``lam``, fits the kernel
    (with the solver ``settings.kernel_solver`` and penalty ``gamma``), prunes
    and centres it, then multiplies ``lam`` by ``decay`` (not below
    ``settings.lam_floor``). Returns the kernels and the final weights, one
    per image.

    ``lam`` may be one weight per image and ``solvers`` one kernel solver per
    image: the images of one batch then run different estimator variants
    (:func:`estimate_variants`), each as it would alone up to float rounding.

    ``softness`` (N, 1, 1, 1), in pixels, models the scene's own edges as
    steps softened by a Gaussian of that width: the latent step deconvolves
    the kernel and the Gaussian together, and the kernel is fitted to the
    softened latent, so the kernel does not absorb the softness (see
    :func:`polish_softness`).
    """
    n = k.shape[0]
    lams = [float(lam)] * n if isinstance(lam, (int, float)) else [float(v) for v in lam]
    solvers = [settings.kernel_solver] * n if solvers is None else list(solvers)
    if len(lams) != n or len(solvers) != n:
        raise ValueError(f"{len(lams)} prior weights and {len(solvers)} kernel solvers for {n} images")
    size = (problem.padded.shape[-2], problem.padded.shape[-1])
    soften = None if softness is None or not bool((softness > 0).any()) else gaussian_otf(size, softness, softness)
    for _ in range(rounds):
        otf = psf2otf(k[:, None], size)
        if soften is not None:
            otf = otf * soften
        latent, observed = l0_latent(problem.padded, problem.mask, otf, lams, growth=settings.beta_growth)
        if soften is not None:
            latent = filter_fft(latent, soften)
        edges = strong_gradients(latent, problem.mask, problem.side) if settings.select_edges else grad(latent)
        raw = fit_kernels(problem, edges, observed, k, gamma, solvers, settings.cg_iterations)
        k = centre_kernel(prune_kernel(raw, settings.kernel_cut, settings.kernel_noise), "centroid")
        lams = [max(v * decay, settings.lam_floor) for v in lams]
    return k, lams


def fit_kernels(problem: LevelProblem, edges: tuple[torch.Tensor, torch.Tensor], observed: torch.Tensor,
                k: torch.Tensor, gamma: float | torch.Tensor, solvers: Sequence[str], cg_iterations: int
                ) -> torch.Tensor:
    """Raw kernels (N, side, side) from latent ``edges``, each image by its own solver ("fft" or "masked").

    ``observed`` is the padded image with its margin refilled (what the
    "fft" solver fits), ``k`` the current kernels (the "masked" solver's warm
    start), ``gamma`` the penalty (a float, or (N, 1, 1, 1) per image).
    """
    unknown = set(solvers) - {"fft", "masked"}
    if unknown:
        raise ValueError(f"unknown kernel solver {sorted(unknown)[0]!r}; expected 'fft' or 'masked'")

    def fit(solver: str, rows: torch.Tensor | None) -> torch.Tensor:
        def part(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        penalty = gamma if isinstance(gamma, float) else part(gamma)
        if solver == "masked":
            valid = problem.valid if problem.valid.ndim == 2 else part(problem.valid)
            return masked_kernel_step((part(edges[0]), part(edges[1])), part(problem.padded), valid, part(k),
                                      penalty, cg_iterations)
        return kernel_step((part(edges[0]), part(edges[1])), part(observed), problem.side, penalty)

    if len(set(solvers)) == 1:
        return fit(solvers[0], None)
    raw = torch.empty_like(k)
    for solver in dict.fromkeys(solvers):
        rows = torch.tensor([s == solver for s in solvers], device=k.device)
        raw[rows] = fit(solver, rows)
    return raw


def estimate_kernels(y: torch.Tensor, settings: L0Settings, side: int, known: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blind kernel estimates (N, side, side) for blurred luminance images ``y`` (N, 1, H, W).

    ``known`` (N, 1, H, W) marks the pixels that are data (``None``: all).
    Returns the final estimates and those of the level before the last,
    resized to ``side``: a trustworthy estimate changes little at the last
    level, a collapsing one does not.
    """
    kernels, previous = estimate_variants(y, settings, side, known, ((settings.kernel_solver, 1.0),))
    return kernels[0], previous[0]


def estimate_variants(y: torch.Tensor, settings: L0Settings, side: int, known: torch.Tensor | None,
                      variants: Sequence[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`estimate_kernels` for several estimator variants at once: (K, N, side, side) twice.

    Each variant is a (kernel solver, multiple of ``settings.lam``) pair. The
    K variants run as one batch of K·N images through the same pyramid, each
    image with its own solver and prior weight, so small images pay the
    per-operation overhead of the coarse levels once instead of K times (on a
    GPU, one launch instead of K). Each variant's estimates are those it would
    give alone, up to float rounding (which the estimator's chaos can carry
    into a visibly different kernel on a hard image, as a change of thread
    count does).
    """
    n, count = y.shape[0], len(variants)
    y, known = estimation_crop(y, settings.window_side(side), known)
    levels = [lv for lv in pyramid_sides(side) if lv[0] <= settings.finest_scale + 1e-6]
    k = torch.zeros(count * n, 3, 3, device=y.device, dtype=y.dtype)
    k[:, 1, 1] = 1.0
    k[:, 1, 0] = k[:, 1, 2] = k[:, 0, 1] = k[:, 2, 1] = 0.25
    k = normalise_kernel(k)
    previous = k
    first = [settings.lam * scale for _, scale in variants for _ in range(n)]
    solvers = [solver for solver, _ in variants for _ in range(n)]
    lams = first
    for scale, ks in levels:
        if settings.restart_lambda:
            lams = first
        h, w = y.shape[-2:]
        size = (max(ks + 2, round(h * scale)), max(ks + 2, round(w * scale)))
        ys = y if scale == 1.0 else F.interpolate(y, size=size, mode="bilinear", antialias=True,
                                                  align_corners=False)
        problem = LevelProblem.build(ys, ks, known).repeated(count)
        previous = k
        k, lams = alternate(problem, resize_kernel(k, ks), settings, lams, settings.gamma, settings.iterations,
                            settings.lam_decay, solvers=solvers)
    shape = (count, n, side, side)
    return finish_kernel(k, side, settings).view(shape), resize_kernel(previous, side).view(shape)


def kernel_extent(k: torch.Tensor, trim: float = SCOUT_TRIM) -> torch.Tensor:
    """Extent in pixels (N,) of kernels (N, h, w): the longer side of the box holding all but ``trim`` of
    their mass at each end of each axis (so a faint speck far out does not count)."""
    def along(profile: torch.Tensor) -> torch.Tensor:
        cumulative = torch.cumsum(profile, dim=1) / profile.sum(dim=1, keepdim=True).clamp(min=1e-12)
        first = (cumulative < trim).sum(dim=1)
        last = (cumulative < 1.0 - trim).sum(dim=1)
        return last - first + 1

    return torch.maximum(along(k.sum(dim=2)), along(k.sum(dim=1))).to(k.dtype)


def scout_extent(y: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None) -> torch.Tensor | None:
    """Blur extent (N,) of luminance images ``y`` (N, 1, H, W) in full-resolution pixels, or ``None``.

    A quick estimate (the classic estimator alone, no polish) with the default
    35-px window on the image reduced by the factor that makes that window
    cover the largest kernel the image allows (up to ``MAX_SCOUTED_KERNEL``),
    keeping at least ``SCOUT_MIN_SIDE`` pixels on its short side and reducing
    at least by half. At that resolution the blur is a few pixels wide and
    the noise averaged away, so on 448-512 px photographs with edges its
    extent comes out within about ±10 px of the truth for 15-70 px camera
    shake; textures (grass, gravel, brick, retina) can miss by 15-40 px
    either way, which costs them the better window. ``None`` when
    the image is too small for that (short side under twice
    ``SCOUT_MIN_SIDE``): on 256-px photographs, reduced to 128 px, textures
    such as brick or porcelain read as 40-50 px blurs when they are 11-21 px,
    and a blur wider than 35 px is rarely recoverable on so small an image.
    """
    h, w = y.shape[-2:]
    limit = min(MAX_SCOUTED_KERNEL, _fitting_side(h, w))
    factor = max(MAX_AUTO_KERNEL / limit, SCOUT_MIN_SIDE / min(h, w))
    if limit <= MAX_AUTO_KERNEL or factor > 0.5:
        return None
    size = (max(3, round(h * factor)), max(3, round(w * factor)))
    small = F.interpolate(y, size=size, mode="bilinear", antialias=True, align_corners=False)
    small_known = None if known is None else level_known(known, size)
    scout = replace(settings, kernel_solver="fft")
    side = min(MAX_AUTO_KERNEL, _fitting_side(*size))
    kernels, _ = estimate_kernels(small, scout, side, small_known)
    return kernel_extent(kernels) / factor


def choose_kernel_side(y: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None) -> int:
    """The kernel window for luminance images ``y`` (N, 1, H, W): one odd side for the batch.

    A configured ``settings.kernel`` (> 0) is used as it is (within a third of
    the image). Otherwise the window is the default ``MAX_AUTO_KERNEL`` unless
    :func:`scout_extent` measures a wider blur (over ``SCOUT_SWITCH`` px) in
    some image of the batch: then ``SCOUT_MARGIN`` times the widest extent,
    up to the image's limit. A window much larger than the blur costs
    accuracy (more unknowns, a coarser pyramid), one smaller than the blur
    cannot represent it at all: a 60-px shake estimated in a 35-px window
    comes out as a wrong, small kernel.
    """
    h, w = y.shape[-2:]
    side = settings.kernel_side(h, w)
    if settings.kernel > 0:
        return side
    extent = scout_extent(y, settings, known)
    if extent is None or float(extent.max()) <= SCOUT_SWITCH:
        return side
    wanted = math.ceil(SCOUT_MARGIN * float(extent.max())) | 1
    return max(side, min(wanted, MAX_SCOUTED_KERNEL, _fitting_side(h, w)))


def finish_kernel(k: torch.Tensor, side: int, settings: L0Settings) -> torch.Tensor:
    """An estimate (N, h, w) as a final kernel: resized to ``side``, pruned, centred by ``settings.centre``, sum 1."""
    return normalise_kernel(centre_kernel(prune_kernel(resize_kernel(k, side)), settings.centre))


def kernel_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Maximum normalised cross-correlation over shifts of kernel pairs (N, h, w) -> (N,)."""
    n, h, w = a.shape
    corr = F.conv2d(a[None], b[:, None], padding=(h - 1, w - 1), groups=n)[0]
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    return corr.flatten(1).amax(dim=1) / norms.clamp(min=1e-12)


def noise_sigma(y: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Noise level the method assumes for images (N, 1, H, W) -> (N,).

    Immerkaer's (1996) fast estimator of Gaussian noise. With ``known``
    (N, 1, H, W), only pixels whose 3×3 neighbourhood is known count: a
    clipped area is flat and would read as noise-free. A JPEG-compressed
    image (:func:`jpeg_compressed`) is assumed
    at least ``JPEG_NOISE_FLOOR`` noisy: compression erases the fine noise the
    estimator reads, but leaves its coarser part and adds its own blocking
    errors, which deconvolution amplifies like noise.
    """
    mask = y.new_tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)
    response = F.conv2d(y, mask).abs()
    if known is None:
        mean = response.flatten(1).mean(dim=1)
    else:
        weight = erode_mask(known, 1)[..., 1:-1, 1:-1].flatten(1)
        mean = (response.flatten(1) * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
    sigma = mean * math.sqrt(math.pi / 2.0) / 6.0
    return torch.where(jpeg_compressed(y), sigma.clamp(min=JPEG_NOISE_FLOOR), sigma)


def jpeg_compressed(y: torch.Tensor) -> torch.Tensor:
    """Which luminance images (N, 1, H, W) look JPEG-compressed -> (N,) bool (blockiness ≥ ``JPEG_BLOCKINESS``)."""
    return jpeg_blockiness(y) >= JPEG_BLOCKINESS


def jpeg_blockiness(y: torch.Tensor) -> torch.Tensor:
    """How JPEG-blocky images (N, 1, H, W) look -> (N,): about 1 without compression, more with.

    Mean absolute pixel differences, across columns and across rows, are
    averaged per position modulo 8 (both directions added, as JPEG's 8×8 grid
    is the same for both); the result is the strongest position's mean over
    the median of the other seven. Images too small to tell (fewer than 8
    grid periods) read 1.
    """
    n = y.shape[0]
    phases = y.new_zeros(n, 8)
    for diffs in ((y[..., :, 1:] - y[..., :, :-1]).abs().mean(dim=-2),
                  (y[..., 1:, :] - y[..., :-1, :]).abs().mean(dim=-1)):
        diffs = diffs.reshape(n, -1)
        usable = diffs.shape[1] // 8 * 8
        if usable < 64:
            return y.new_ones(n)
        phases = phases + diffs[:, :usable].view(n, -1, 8).mean(dim=1)
    strongest, _ = phases.max(dim=1)
    others = phases.sort(dim=1).values[:, :7]
    return strongest / others.median(dim=1).values.clamp(min=1e-12)


def explained_residual(y: torch.Tensor, latent: torch.Tensor, kernels: torch.Tensor,
                       known: torch.Tensor | None = None) -> torch.Tensor:
    """RMS of ``k * latent - y`` over the pixels a kernel of this size fully covers -> (N,).

    With ``known`` (N, 1, H, W) only known pixels of ``y`` count (a clipped
    pixel is not explained by any kernel).
    """
    side = kernels.shape[-1]
    pad = side // 2
    flipped = torch.flip(kernels, dims=(-2, -1))[:, None]
    n = y.shape[0]
    reblurred = F.conv2d(latent.transpose(0, 1), flipped, groups=n).transpose(0, 1)
    h, w = reblurred.shape[-2:]
    error = (reblurred - y[..., pad:pad + h, pad:pad + w]).pow(2).flatten(1)
    if known is None:
        return error.mean(dim=1).sqrt()
    weight = known[..., pad:pad + h, pad:pad + w].flatten(1)
    return ((error * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)).sqrt()


def centring(y: torch.Tensor, restored: torch.Tensor, reach: int) -> torch.Tensor:
    """How well restorations line up with their blurred input -> (N,), 1 = best at zero shift.

    The cross-correlation of the restored luminance ``restored`` with the
    input's ``y`` (both (N, 1, H, W), means removed) at zero shift, over its
    maximum within ``reach`` pixels. Blurring by a centred kernel moves
    nothing far, so a right restoration peaks at or near zero (0.6 or more on
    the benchmarks, usually above 0.9). On a periodic texture (bricks) an
    estimate can put the kernel's mass a whole period off its middle and
    still explain the input to the noise level: its restoration is the
    scene moved by that period (−10 dB on a brick wall), peaks there and
    scores 0.1-0.2 here. The correlation is zero-padded, so shifts within
    ``reach`` do not wrap.
    """
    h, w = y.shape[-2:]
    a = y - y.mean(dim=(-2, -1), keepdim=True)
    b = restored - restored.mean(dim=(-2, -1), keepdim=True)
    size = (fft_size(h + reach), fft_size(w + reach))
    corr = torch.fft.irfft2(torch.fft.rfft2(b, s=size) * torch.fft.rfft2(a, s=size).conj(), s=size)
    near = torch.roll(corr, shifts=(reach, reach), dims=(-2, -1))[..., :2 * reach + 1, :2 * reach + 1].flatten(1)
    peak = near.amax(dim=1)
    zero = near[:, reach * (2 * reach + 1) + reach]
    return torch.where(peak > 0, zero / peak.clamp(min=1e-12), torch.ones_like(peak))


def blur_effect(y: torch.Tensor, size: int = 11) -> torch.Tensor:
    """No-reference blur measure of images (N, 1, H, W) -> (N,), 0 = sharp, 1 = very blurred.

    Crété-Roffet et al. (2007), as in ``skimage.measure.blur_effect``: the share
    of the image's edge strength that survives blurring it again with a
    ``size``-pixel box filter, along each axis; the larger of the two.
    """
    sobel = y.new_tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
    scores = []
    for axis in (0, 1):
        kernel = (sobel if axis == 0 else sobel.T).reshape(1, 1, 3, 3)
        pad = (0, 0, size // 2, size // 2) if axis == 0 else (size // 2, size // 2, 0, 0)
        box = (size, 1) if axis == 0 else (1, size)
        reblurred = F.avg_pool2d(F.pad(y, pad, mode="reflect"), box, stride=1)
        sharp_edges = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), kernel).abs()[..., 2:-1, 2:-1]
        blur_edges = F.conv2d(F.pad(reblurred, (1, 1, 1, 1), mode="reflect"), kernel).abs()[..., 2:-1, 2:-1]
        total = sharp_edges.flatten(1).sum(dim=1).clamp(min=1e-12)
        lost = (sharp_edges - blur_edges).clamp(min=0.0).flatten(1).sum(dim=1)
        scores.append((total - lost).abs() / total)
    return torch.maximum(scores[0], scores[1])


# ---------------------------------------------------------------- model


RGB_TO_YCC = (REC601_LUMA, (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def prior_weight(y: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None
                 ) -> float | torch.Tensor:
    """The final step's prior weight for luminance images ``y`` (N, 1, H, W): a float, or (N, 1, 1, 1).

    ``settings.final_lambda`` when set; otherwise ``settings.lambda_per_sigma``
    times the noise measured on the pixels ``known`` marks, within ``AUTO_LAMBDA_RANGE``.
    """
    if settings.final_lambda > 0:
        return settings.final_lambda
    sigma = noise_sigma(y, known)
    return (settings.lambda_per_sigma * sigma).clamp(*AUTO_LAMBDA_RANGE).view(-1, 1, 1, 1)


def final_deconvolution(x: torch.Tensor, kernels: torch.Tensor, settings: L0Settings,
                        known: torch.Tensor | None = None, solved: SolvedTile | None = None) -> torch.Tensor:
    """Non-blind deconvolution of every channel of ``x`` (N, C, H, W) by its image's kernel.

    ``settings.final_lambda`` = 0 picks the prior weight per image from its
    measured noise (``AUTO_LAMBDA_PER_SIGMA`` × σ, within ``AUTO_LAMBDA_RANGE``;
    proportional to σ² over-smoothed grey images in the benchmark). With
    ``settings.chroma_weight`` > 0 a colour image is deconvolved as luminance
    plus two chroma channels (YCbCr), the chroma with that many times the
    luminance's weight: colour differences carry little detail and as much
    noise, so they take a stronger prior than the three correlated RGB
    channels would each get. ``known`` (N, 1 or C, H, W) leaves clipped
    pixels (or clipped channels of a pixel) out of the data term; the prior
    fills them in, kept at least as bright as the clipped value
    (:func:`clipped_floor`).

    An image with a side longer than ``settings.final_tile`` plus twice the
    tile context is solved tile by tile (:func:`tiled_deconvolution`), with
    the prior weight and the clipped-value floors measured on the whole image;
    ``solved``, one tile already solved with these kernels (the guard's, see
    :func:`judge_tile`), is used instead of solving it again.
    """
    lam, floor = deconvolution_weights(x, settings, known)
    layout = tile_layout(x.shape[-2:], kernels.shape[-1], settings)
    if layout is not None:
        return tiled_deconvolution(x, kernels, settings, lam, known, floor, *layout, solved=solved)
    return _deconvolve(x, kernels, settings, lam, known, floor)


def deconvolution_weights(x: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None
                          ) -> tuple[float | torch.Tensor, torch.Tensor | None]:
    """The final step's prior weight and clipped-value floors for images ``x`` (N, C, H, W), from the whole images."""
    lam = prior_weight(luminance(x), settings, None if known is None else known.amin(dim=1, keepdim=True))
    floor = None if known is None else clipped_floor(x, settings.saturation)
    return lam, floor


def tile_context(kernel_side: int) -> int:
    """Pixels of image solved around each tile's core so the tile's own borders do not reach into it."""
    return max(FINAL_TILE_MIN_CONTEXT, FINAL_TILE_CONTEXT_PER_KERNEL * kernel_side)


def tile_layout(shape: tuple[int, int] | torch.Size, kernel_side: int, settings: L0Settings) -> tuple[int, int] | None:
    """(core side, context) of the tiles an image of ``shape`` (H, W) is deconvolved in; ``None``: solved whole."""
    context = tile_context(kernel_side)
    if settings.final_tile > 0 and max(shape) > settings.final_tile + 2 * context:
        return settings.final_tile, context
    return None


@dataclass(frozen=True)
class SolvedTile:
    """One tile of :func:`tiled_deconvolution`: its core's top-left corner and its solve (N, C, h, w) with context."""

    top: int
    left: int
    image: torch.Tensor


def judge_tile(shape: tuple[int, int] | torch.Size, core: int, context: int, centre: tuple[float, float]
               ) -> tuple[int, int, tuple[slice, slice]]:
    """The tile of :func:`tiled_deconvolution`'s grid for an image of ``shape`` whose core is nearest ``centre``.

    Returns its core's top-left corner and the region (rows, columns) it is
    solved on, core plus context, cut at the frame: what
    :func:`tiled_deconvolution` solves for that core, so a solve of the
    region is the tile itself.
    """
    h, w = shape
    core_h, core_w = min(core, h), min(core, w)
    top = min(tile_starts(h, core_h, FINAL_TILE_BLEND), key=lambda y0: abs(y0 + core_h / 2 - centre[0]))
    left = min(tile_starts(w, core_w, FINAL_TILE_BLEND), key=lambda x0: abs(x0 + core_w / 2 - centre[1]))
    region = (slice(max(0, top - context), min(h, top + core_h + context)),
              slice(max(0, left - context), min(w, left + core_w + context)))
    return top, left, region


def tiled_deconvolution(x: torch.Tensor, kernels: torch.Tensor, settings: L0Settings, lam: float | torch.Tensor,
                        known: torch.Tensor | None, floor: torch.Tensor | None, core: int, context: int,
                        solved: SolvedTile | None = None) -> torch.Tensor:
    """:func:`final_deconvolution` of a large ``x`` (N, C, H, W) in tiles, so memory stays bounded.

    The image is cut into cores of ``core`` pixels that overlap by
    ``FINAL_TILE_BLEND``; each core is solved together with ``context``
    pixels of the image around it (fewer at the frame), whose own borders are
    unknown data as the whole image's are, and only the core is kept,
    blended into its neighbours with raised-cosine ramps. With a context of
    a few kernel sides the result matches the whole-image solve to well under
    one grey level; the solver then never holds more than
    ``(core + 2 context)²`` pixels per channel, where a whole 24-megapixel
    scan would take several GB. The tile ``solved`` names is taken as given.
    """
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    weight = x.new_zeros(h, w)
    core_h, core_w = min(core, h), min(core, w)
    columns = [(x0, blend_ramp(core_w, FINAL_TILE_BLEND, rise=x0 > 0, fall=x0 + core_w < w).to(x))
               for x0 in tile_starts(w, core_w, FINAL_TILE_BLEND)]
    for y0 in tile_starts(h, core_h, FINAL_TILE_BLEND):
        top, bottom = max(0, y0 - context), min(h, y0 + core_h + context)
        wy = blend_ramp(core_h, FINAL_TILE_BLEND, rise=y0 > 0, fall=y0 + core_h < h).to(x)
        for x0, wx in columns:
            left, right = max(0, x0 - context), min(w, x0 + core_w + context)
            region = (..., slice(top, bottom), slice(left, right))
            if solved is not None and (solved.top, solved.left) == (y0, x0):
                tile = solved.image
            else:
                tile = _deconvolve(x[region], kernels, settings, lam, None if known is None else known[region],
                                   None if floor is None else floor[region])
            kept = tile[..., y0 - top:y0 - top + core_h, x0 - left:x0 - left + core_w]
            mask = wy[:, None] * wx[None, :]
            out[..., y0:y0 + core_h, x0:x0 + core_w].addcmul_(kept, mask)
            weight[y0:y0 + core_h, x0:x0 + core_w].add_(mask)
    return out / weight


def _deconvolve(x: torch.Tensor, kernels: torch.Tensor, settings: L0Settings, lam: float | torch.Tensor,
                known: torch.Tensor | None, floor: torch.Tensor | None) -> torch.Tensor:
    """The solve behind :func:`final_deconvolution`, at a given prior weight ``lam`` and floors ``floor``."""
    if settings.final == "wiener":
        return wiener(x, kernels, nsr=lam, known=known, floor=floor)  # each image at its own noise's weight
    alpha = 1.0 if settings.final == "tv" else 0.8
    if x.shape[1] != 3 or settings.chroma_weight <= 0:
        return sparse_deconv(x, kernels, lam, alpha=alpha, known=known, floor=floor)
    to_ycc = x.new_tensor(RGB_TO_YCC)
    ycc = torch.einsum("ij,njhw->nihw", to_ycc, x)
    weights = x.new_tensor([1.0, settings.chroma_weight, settings.chroma_weight]).view(1, 3, 1, 1)
    to_rgb = torch.linalg.inv(to_ycc)
    out = sparse_deconv(ycc, kernels, torch.as_tensor(lam, dtype=x.dtype, device=x.device) * weights, alpha=alpha,
                        known=known, floor=floor, data_space=to_rgb)
    return torch.einsum("ij,njhw->nihw", to_rgb, out)


def restore(x: torch.Tensor, settings: L0Settings) -> Restored:
    """Estimate a kernel per image of ``x`` (N, C, H, W) in [0, 1] and deconvolve with it.

    With ``settings.light`` "linear" the blur is undone in linear light: the
    sRGB tone curve is taken off the stored values first and put back on the
    result (:func:`restore_in_linear_light`); "encoded" works on the stored
    values as they are. The rest of this docstring holds for either.

    Images whose short side is below ``MIN_ESTIMATE_SIDE`` pixels come back
    as they went in (``blur_detected`` = 0), guard or not: there is too little
    to estimate a kernel from. With ``settings.guard`` on, images that do not look blurred
    (:func:`blur_effect` below ``NO_BLUR_EFFECT``; ``blur_detected`` = 0) and
    images whose estimate fails :func:`trust` or stretched along edges that
    cannot measure it (:func:`unconstrained_length`; ``kernel_fallback`` = 1) come
    back as they went in, with a delta kernel; so do images whose kernel is
    no wider than ``NO_BLUR_EXTENT`` pixels (nothing to undo). The others are
    moved by their kernel's sub-pixel centring remainder (``settings.subpixel``;
    the returned kernels stay centred to whole pixels). When the best-ranked
    candidate estimate fails :func:`trust`, the next ones are tried before
    falling back (:func:`_restore_trusted`); with ``settings.refit_iterations``
    > 0 a trusted kernel is then refitted (:func:`refit_kernels`) and kept so
    if the result still passes (metric ``kernel_refit`` = 1). Clipped pixels
    (``settings.saturation``) are unknown data throughout; their share is the
    metric ``saturated_share``. With ``settings.defocus`` on, an estimate that
    looks like a defocus disc is replaced by the disc that best explains the
    estimation window's spectrum before it is restored and judged
    (:func:`defocus_kernels`; its radius is the metric ``defocus_radius``, 0
    where the estimate stays or the image falls back). Images the blur measure
    calls sharp but whose spectrum looks defocused (:func:`blurred_by_spectrum`)
    are estimated too, and restored only if their estimate gives way to a disc.
    """
    if settings.light == "linear":
        return restore_in_linear_light(x, settings)
    if settings.light not in LIGHT_CHOICES:
        raise ValueError(f"unknown light {settings.light!r}; expected one of {', '.join(LIGHT_CHOICES)}")
    n, _, h, w = x.shape
    y = luminance(x)
    # clipped channels for the final deconvolution; the estimate, on luminance, drops a pixel if any clipped
    channel_known = clipped_mask(x, settings, per_channel=True)
    known = None if channel_known is None else channel_known.amin(dim=1, keepdim=True)
    large_enough = min(h, w) >= MIN_ESTIMATE_SIDE
    # a featureless image (a blank page, a black frame) has no edges to estimate a kernel from: the blur measure
    # calls it 'very blurred' (nothing survives a box filter that was not there) and the spectrum a defocus
    flat = (y.amax(dim=(1, 2, 3)) - y.amin(dim=(1, 2, 3))) < FLAT_RANGE
    if not large_enough:
        blurred = torch.zeros(n, dtype=torch.bool, device=x.device)
    elif settings.guard:
        blurred = (blur_effect(y) >= NO_BLUR_EFFECT) & ~flat
    else:
        blurred = torch.ones(n, dtype=torch.bool, device=x.device)
    # images the blur measure calls sharp but whose spectrum says defocused: restored only with a disc (below)
    suspected = torch.zeros_like(blurred)
    if settings.defocus and large_enough and not bool((blurred | flat).all()):
        rows = (~blurred & ~flat).nonzero().flatten()
        suspected[rows] = blurred_by_spectrum(y[rows], _rows(known, rows), settings)
        blurred |= suspected
    side = choose_kernel_side(y[blurred], settings, _rows(known, blurred)) if bool(blurred.any()) \
        else settings.kernel_side(h, w)
    chosen, centred, refitted = x.new_zeros(n), x.new_ones(n), torch.zeros(n, dtype=torch.bool, device=x.device)
    if bool(blurred.any()):
        # the window the kernel is estimated on, and where the defocus step reads the spectrum
        box = estimation_box(y, settings.window_side(side), known)
        window, window_known = estimation_crop(y, settings.window_side(side), known, box)
        kernels, image, held, agreement, residual, chosen, centred, refitted, radius, judged = _restore_trusted(
            x, y, known, channel_known, blurred, settings, side, window, window_known, box, suspected)
    else:  # nothing looks blurred: skip the work
        kernels = normalise_kernel(x.new_zeros(n, side, side))
        image, agreement, residual, radius, judged = x, x.new_ones(n), x.new_zeros(n), x.new_zeros(n), None
        held = torch.ones_like(blurred)
    blurred &= ~suspected | (radius > 0)  # a suspected image whose estimate is no disc stays as it is
    restored = held & blurred  # blurred, and the kept estimate passed the guard (always held with the guard off)
    radius = torch.where(restored, radius, 0.0)
    delta = normalise_kernel(torch.zeros_like(kernels))
    kernels = torch.where(restored.view(n, 1, 1), kernels, delta)
    support = kernels > 0
    extent = torch.maximum(_span(support.any(dim=2)), _span(support.any(dim=1))).to(x.dtype)
    # a kernel of at most 2 px means no blur worth removing: keep the input as it is
    changed = restored & (extent > NO_BLUR_EXTENT)
    if judged is not None and bool(changed.any()):
        # a large image was judged on one tile: only the kernel it keeps deconvolves the rest, reusing that tile
        rows = changed.nonzero().flatten()
        image[rows] = final_deconvolution(x[rows], kernels[rows], settings, _rows(channel_known, rows),
                                          SolvedTile(judged.top, judged.left, judged.image[rows])).clamp(0.0, 1.0)
    if settings.subpixel and bool(changed.any()):
        # the kernels are centred to the nearest pixel; move the output the rest of the way
        offset = torch.where(changed.view(n, 1), centre_offset(kernels, settings.centre), 0.0)
        image = subpixel_shift(image, -offset).clamp(0.0, 1.0)
    image = torch.where(changed.view(n, 1, 1, 1), image, x)
    metrics = {
        "kernel_size": extent,
        "kernel_sparsity": 1.0 - support.flatten(1).float().mean(dim=1),
        "kernel_fallback": (blurred & ~held).to(x.dtype),
        "blur_detected": blurred.to(x.dtype),
        "kernel_scale_agreement": agreement,
        "kernel_residual_ratio": residual,
        "output_centring": centred,
        "kernel_candidate": chosen,
        "kernel_refit": (refitted & restored).to(x.dtype),
        "defocus_radius": radius,
        "saturated_share": x.new_zeros(n) if known is None else 1.0 - known.flatten(1).mean(dim=1),
    }
    return Restored(image, kernels=kernels, metrics=metrics)


def restore_in_linear_light(x: torch.Tensor, settings: L0Settings) -> Restored:
    """:func:`restore` of sRGB-encoded images ``x`` (N, C, H, W) whose blur happened in linear light.

    A shaking camera integrates light before its tone curve is applied, so a
    real camera-shake photograph is a convolution of the scene in linear
    light, not in its stored values: near a bright edge the stored blur is
    lopsided, the kernel estimated from it is wrong and the restoration
    rings. The images are taken to linear light (:func:`models.tone.srgb_to_linear`),
    restored there, with the clipping level moved along, and the result
    encoded again; kernels and metrics are those of the linear restoration.
    Images it leaves alone (no blur, or a fallback) come back exactly as they
    went in, not through the curve and back.
    """
    linear = srgb_to_linear(x)
    out = restore(linear, linear_light_settings(settings))
    untouched = (out.image == linear).flatten(1).all(dim=1).view(-1, 1, 1, 1)
    image = torch.where(untouched, x, linear_to_srgb(out.image).clamp(0.0, 1.0))
    return Restored(image, kernels=out.kernels, metrics=out.metrics)


def linear_light_settings(settings: L0Settings) -> L0Settings:
    """``settings`` for images already in linear light: nothing more to undo, the clipping level moved there."""
    return replace(settings, light="encoded", saturation=float(srgb_to_linear(settings.saturation)))


def _too_clipped_for_spectrum(window_known: torch.Tensor | None, i: int) -> bool:
    """Whether window ``i`` has more than ``DEFOCUS_MAX_CLIPPED`` of its pixels clipped (its spectrum misleads)."""
    return window_known is not None and 1.0 - float(window_known[i].float().mean()) > DEFOCUS_MAX_CLIPPED


def blurred_by_spectrum(y: torch.Tensor, known: torch.Tensor | None, settings: L0Settings) -> torch.Tensor:
    """Which luminance images (N, 1, H, W) look defocused by their spectrum's account -> (N,) bool.

    :func:`blur_effect` measures how much edge strength survives a further
    blur, and strong texture (bricks, gravel) or noise reads as sharp to it
    even under a 4-px defocus; a smooth scene (a retina) reads as sharp under
    any blur. The spectrum does not have that weakness: an image counts here
    when the defocus disc that best explains its estimation window
    (:class:`SpectrumScorer`) has a radius of at least ``GATE_DISC_RADIUS``.
    On sharp photographs the best disc is 0.7-1.8 px (the image model
    explains a natural fall-off of fine detail as a little blur). It does
    not say which blur: camera shake is explained by a disc better than by
    none, so :func:`restore` restores such an image only with a disc. Windows
    with more than ``DEFOCUS_MAX_CLIPPED`` of their pixels clipped are not
    judged.
    """
    n, h, w = y.shape[0], y.shape[-2], y.shape[-1]
    window, window_known = estimation_crop(y, settings.window_side(settings.kernel_side(h, w)), known)
    out = torch.zeros(n, dtype=torch.bool, device=y.device)
    rows = [i for i in range(n) if not _too_clipped_for_spectrum(window_known, i)]
    if rows:
        fit = SpectrumScorer(window[rows], noise_sigma(window[rows])).best(
            "disk", family_extent("disk", GATE_SEARCH_RADIUS), upper=GATE_SEARCH_RADIUS)
        out[rows] = (fit.parameters >= GATE_DISC_RADIUS).to(y.device)
    return out


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The images ``rows`` of an optional batch tensor."""
    return None if t is None else t[rows]


def _part(t: torch.Tensor | None, rows: torch.Tensor, region: tuple[object, slice, slice]) -> torch.Tensor | None:
    """The ``region`` (``..., rows, columns``) of the images ``rows`` of an optional batch tensor."""
    return None if t is None else t[rows][region]


def _restore_trusted(x: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None,
                     channel_known: torch.Tensor | None, blurred: torch.Tensor, settings: L0Settings, side: int,
                     window: torch.Tensor, window_known: torch.Tensor | None, box: tuple[int, int, int, int],
                     suspected: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Kernels, restorations, whether each kept estimate held (passed the guard), agreements, residual ratios,
    chosen variants, centrings, refit flags, disc radii and, for an image deconvolved in tiles, the tile the
    guard judged (else ``None``).

    ``window`` (and ``window_known``) is the ``box`` (top, left, height,
    width) of ``y`` (:func:`estimation_box`) the kernels are estimated on.

    An image the final step deconvolves in tiles (:func:`tile_layout`) is
    judged on one tile only, the one nearest the estimation window
    (:func:`judge_tile`, solved exactly as the tiled deconvolution will): its
    image comes back as it went in, and :func:`restore` deconvolves it with
    the kernel that held, reusing the judged tile. A candidate that
    fails then costs one tile, not a whole scan (a 24-megapixel image whose
    first candidate failed spent about 220 s on it).

    Every image is restored with its best-ranked candidate (:func:`rank_candidates`,
    polished). A blurred image whose result fails :func:`trust`, or whose estimate
    stretched along edges that cannot measure its length (:func:`unconstrained_length`), is restored again
    with its next-ranked candidate, and so on: the candidates fail on different
    images, so one whose best-explaining estimate collapsed often has another that
    holds (china on the grey benchmark: +3.4 dB instead of the fallback). Results
    that fail for every candidate keep the first one's figures, and ``restore``
    falls back. Extra candidates cost a polish and a final deconvolution each,
    and only for the images that need them. With ``settings.defocus`` on, each
    candidate that looks like a defocus disc gives way to the disc
    (:func:`defocus_kernels`) before its restoration, so the guard judges the
    disc's result and a disc costs no second full-size deconvolution. An
    image in ``suspected`` (N,) bool (the blur measure calls it sharp, its
    spectrum says defocused; :func:`restore`) is restored only with a disc,
    so for it a candidate that does not give way to one does not hold either:
    the next is tried (the candidates' ranking is a close call on textures,
    and a brick wall under a 2.8-px disc was left untouched whenever the
    ragged estimate happened to rank first).

    With ``settings.refit_iterations`` > 0 the kernels that held are then
    refitted (:func:`refit_kernels`) and their images restored again; a
    refitted result replaces the polished one only if it passes :func:`trust`
    too and its restoration, re-blurred, explains the input within
    ``REFIT_RESIDUAL_RISE`` of the polished one's residual (on a brick wall at
    0.5 % noise a refit that moved mass along the texture's period raised it
    by 10 % and lost 1.1 dB). The guard judges the polished kernel first
    because a refit fits any kernel closer to the data: a collapsed estimate
    refitted can explain its input well enough to pass (retina on the grey
    benchmark, −9 dB).
    """
    n = x.shape[0]
    sigma = noise_sigma(y, known).clamp(min=GUARD_NOISE_FLOOR)
    ranked = rank_candidates(window, settings, side, window_known)
    kernels, previous = x.new_zeros(n, side, side), x.new_zeros(n, side, side)
    image = x.clone()
    agreement, residual, chosen, centre_score = x.new_zeros(n), x.new_zeros(n), x.new_zeros(n), x.new_ones(n)
    radius = x.new_zeros(n)
    held = torch.zeros(n, dtype=torch.bool, device=x.device)
    layout = tile_layout(x.shape[-2:], side, settings)
    judged: SolvedTile | None = None
    if layout is not None:
        lam, floor = deconvolution_weights(x, settings, channel_known)
        top, left, (tile_rows, tile_columns) = judge_tile(x.shape[-2:], *layout,
                                                          centre=(box[0] + box[2] / 2, box[1] + box[3] / 2))
        region = (..., tile_rows, tile_columns)
        judged = SolvedTile(top, left, x[region].clone())
    solves = image if judged is None else judged.image  # where each kept candidate's solve goes

    def judge(rows: torch.Tensor, k: torch.Tensor, before: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if judged is None:
            restored = final_deconvolution(x[rows], k, settings, _rows(channel_known, rows)).clamp(0.0, 1.0)
            seen, seen_y, seen_known = restored, y[rows], _rows(known, rows)
        else:  # the judged tile alone, solved as tiled_deconvolution solves it, and kept unclamped for it
            restored = _deconvolve(x[rows][region], k, settings, lam if isinstance(lam, float) else lam[rows],
                                   _part(channel_known, rows, region), _part(floor, rows, region))
            seen, seen_y, seen_known = restored.clamp(0.0, 1.0), y[rows][region], _part(known, rows, region)
        agree = kernel_agreement(k, before)
        restored_y = luminance(seen)
        ratio = explained_residual(seen_y, restored_y, k, seen_known) / sigma[rows]
        centred = centring(seen_y, restored_y, side)
        good = trust(agree, ratio, centred) & ~unconstrained_length(k, restored_y) if settings.guard \
            else torch.ones_like(agree, dtype=torch.bool)
        return restored, agree, ratio, centred, good

    rows = torch.arange(n, device=x.device)
    for rank in range(ranked[2].shape[1]):
        k, before, pick = ranked_choice(window, window_known, ranked, rows, rank, settings)
        radii = k.new_zeros(rows.numel())
        if settings.defocus:  # decided before the restoration, so a disc costs no second deconvolution
            k, radii = defocus_kernels(window[rows], _rows(window_known, rows), k)
        restored, agree, ratio, centred, good = judge(rows, k, before)
        good &= ~suspected[rows] | (radii > 0)  # an image only a disc may restore: a free-form candidate fails
        take = good | (rank == 0)  # the first rank fills every image; later ranks only where they hold
        into = rows[take]
        kernels[into], previous[into], solves[into], radius[into] = k[take], before[take], restored[take], radii[take]
        agreement[into], residual[into], chosen[into] = agree[take], ratio[take], pick[take].to(x.dtype)
        centre_score[into] = centred[take]
        held[rows[good]] = True
        rows = rows[~good]
        rows = rows[blurred[rows]]
        if rows.numel() == 0:
            break
    refitted = torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = (held & blurred & (radius == 0)).nonzero().flatten()  # a defocus disc is not refitted
    if settings.refit_iterations > 0 and rows.numel() > 0:
        k, changed = refit_kernels(window[rows], kernels[rows], settings, _rows(window_known, rows))
        rows, k = rows[changed], k[changed]
        if rows.numel() > 0:
            restored, agree, ratio, centred, good = judge(rows, k, previous[rows])
            good &= ratio <= REFIT_RESIDUAL_RISE * residual[rows]  # it must explain the input as well as before
            into = rows[good]
            kernels[into], solves[into] = k[good], restored[good]
            agreement[into], residual[into], centre_score[into] = agree[good], ratio[good], centred[good]
            refitted[into] = True
    return kernels, image, held, agreement, residual, chosen, centre_score, refitted, radius, judged


def disc_kernel(radius: float, side: int, like: torch.Tensor) -> torch.Tensor:
    """The defocus disc of ``radius`` px in a ``side`` × ``side`` window, dtype and device of ``like``."""
    disc = torch.from_numpy(family_kernel("disk", radius)).to(like)
    out = like.new_zeros(side, side)
    margin = (side - disc.shape[0]) // 2
    out[margin:margin + disc.shape[0], margin:margin + disc.shape[1]] = disc
    return out


def moment_radius(k: torch.Tensor) -> float:
    """The radius of the disc with the same second moment as the kernel (h, w): E[r²] = R² / 2."""
    mass, dy, dx = centred_coordinates(k[None])
    return float(torch.sqrt(2 * (mass * (dy ** 2 + dx ** 2)).sum()))


def centred_coordinates(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernels (N, h, w) as mass (summing to 1) and each pixel's offset from their centroid: (mass, dy, dx).

    ``dy`` is (N, h, 1) and ``dx`` (N, 1, w); the kernels' second moments are
    sums of ``mass`` times their products.
    """
    n, h, w = k.shape
    mass = k / k.sum(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    ys = torch.arange(h, device=k.device, dtype=k.dtype).view(1, h, 1)
    xs = torch.arange(w, device=k.device, dtype=k.dtype).view(1, 1, w)
    return mass, ys - (mass * ys).sum(dim=(1, 2), keepdim=True), xs - (mass * xs).sum(dim=(1, 2), keepdim=True)


def defocus_kernels(window: torch.Tensor, window_known: torch.Tensor | None, kernels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Defocus discs for the estimates (N, side, side) that are discs in all but their ragged rim.

    Returns the kernels with those estimates replaced by the disc whose radius
    best explains the estimation window's spectrum (:class:`SpectrumScorer`),
    and the radii (0 where an estimate stays). A free-form estimate of a
    defocus blur is roughly right but ragged at its rim, which at low noise
    costs up to 6 dB against the true disc; the spectrum pins the radius to a
    tenth of a pixel. Windows with more than ``DEFOCUS_MAX_CLIPPED`` of their
    pixels clipped keep their estimate: a clipped highlight is not blurred by
    the disc and would mislead the spectrum.
    """
    n, side = kernels.shape[0], kernels.shape[-1]
    out, radii = kernels.clone(), kernels.new_zeros(n)
    rows, rough = [], []
    for i in range(n):
        if _too_clipped_for_spectrum(window_known, i):
            continue
        r0 = moment_radius(kernels[i])
        if family_extent("disk", r0) > side or r0 < DEFOCUS_MIN_RADIUS / 2:
            continue
        if float(kernel_agreement(kernels[i : i + 1], disc_kernel(r0, side, kernels)[None])[0]) >= DEFOCUS_PRECHECK:
            rows.append(i)
            rough.append(r0)
    if not rows:
        return out, radii
    scorer = SpectrumScorer(window[rows], noise_sigma(window[rows]))
    # the estimate's own radius is within a few tenths of the disc's (2.2-2.4 px for 2, 4.1-4.4 for 4)
    fit = scorer.best("disk", side, upper=DEFOCUS_SEARCH_REACH * max(rough) + 1.0)
    for j, i in enumerate(rows):
        radius = float(fit.parameters[j])
        if radius < DEFOCUS_MIN_RADIUS:
            continue
        disc = disc_kernel(radius, side, kernels)
        own = float(scorer.score(scorer.transfer_power(kernels[i]), [j])[0])
        agree = float(kernel_agreement(kernels[i : i + 1], disc[None])[0])
        if agree >= DEFOCUS_MIN_AGREEMENT and float(fit.scores[j]) - own <= DEFOCUS_MAX_DEFICIT:
            out[i], radii[i] = disc, radius
    return out, radii


def clipped_mask(x: torch.Tensor, settings: L0Settings, per_channel: bool = False) -> torch.Tensor | None:
    """The data mask that leaves out clipped pixels of ``x``, or ``None`` if none are clipped.

    (N, 1, H, W) for the kernel estimate, which works on luminance; with
    ``per_channel`` (N, C, H, W) for the final deconvolution of every channel.
    """
    if settings.saturation <= 0:
        return None
    known = unsaturated_mask(x, settings.saturation, per_channel=per_channel)
    return None if bool(known.min() > 0) else known


def best_estimate(y: torch.Tensor, settings: L0Settings, side: int, known: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel estimates for luminance images ``y`` (N, 1, H, W), the best of several per image.

    Runs the first ``settings.candidates`` estimator variants of
    :data:`CANDIDATES` (with 1, just the estimator ``settings`` describes) and keeps, per image, the kernel whose restoration
    (the final deconvolution of the luminance of the estimation window, at
    ``settings.select_weight`` times the output's prior weight), re-blurred,
    explains the input best: at a fixed, firm prior weight a wrong kernel
    leaves a larger residual. Different variants fail on different
    images, so the choice is more often right than any one of them (mean
    +0.3 dB on the benchmark, and fewer large losses). Returns the kernels,
    their estimates one level before the last (for :func:`trust`) and the
    index of the variant chosen, as floats (N,). The chosen kernels are then
    polished (:func:`polish_kernels`) unless ``settings.polish_iterations`` is 0.
    ``known`` (N, 1, H, W) marks the pixels that are data (``None``: all).
    """
    window, known = estimation_crop(y, settings.window_side(side), known)
    ranked = rank_candidates(window, settings, side, known)
    rows = torch.arange(y.shape[0], device=y.device)
    kernels, previous, pick = ranked_choice(window, known, ranked, rows, 0, settings)
    return kernels, previous, pick.to(y.dtype)


def ranked_choice(window: torch.Tensor, known: torch.Tensor | None,
                  ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: torch.Tensor, rank: int,
                  settings: L0Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank``-th candidate of the images ``rows``: kernels (polished unless
    ``settings.polish_iterations`` is 0), their previous-level estimates and variant indices.

    ``ranked`` is what :func:`rank_candidates` returned for the estimation
    ``window`` (N, 1, H, W) of the whole batch, ``known`` its data mask.
    """
    candidates, previous, order = ranked
    pick = order[rows, rank]
    kernels = candidates[pick, rows]
    if settings.polish_iterations > 0:
        kernels = polish_kernels(window[rows], kernels, settings, _rows(known, rows))
    return kernels, previous[pick, rows], pick


def polish_kernels(y: torch.Tensor, kernels: torch.Tensor, settings: L0Settings,
                   known: torch.Tensor | None = None) -> torch.Tensor:
    """Kernels (N, side, side) for luminance ``y`` (N, 1, H, W) after the full-resolution polish.

    ``settings.polish_iterations`` alternations with the weak prior and
    penalty (:func:`polish_weights`, :func:`polish_penalty`: both firmer
    under noise) on the whole image, by the FFT kernel step; then finished
    like any final estimate (:func:`finish_kernel`).
    JPEG-compressed images (:func:`jpeg_compressed`) are polished with a
    ``JPEG_POLISH_LAMBDA`` times stronger prior, so the latent does not take
    up the blocks. The padded problem is rebuilt here rather than kept from
    the pyramid's finest level: padding costs one FFT blur, next to the eight
    alternations.
    """
    side = kernels.shape[-1]
    polished = kernels.clone()
    sigma = noise_sigma(y, known)  # read once for the penalty and the softness
    gamma = polish_penalty(y, settings, known, sigma)
    softness = polish_softness(y, settings, known, sigma)
    blocky = jpeg_compressed(y)
    weights = polish_weights(sigma, blocky, settings)
    for rows in (~blocky, blocky):  # apart, so an uncompressed image is polished exactly as it would be alone
        if bool(rows.any()):
            lam = [weights[i] for i in rows.nonzero().flatten().tolist()]
            polished[rows], _ = alternate(LevelProblem.build(y[rows], side, _rows(known, rows)), kernels[rows],
                                          replace(settings, kernel_solver="fft"), lam,
                                          gamma if isinstance(gamma, float) else gamma[rows],
                                          settings.polish_iterations, softness=softness[rows])
    return finish_kernel(polished, side, settings)


def polish_weights(sigma: torch.Tensor, blocky: torch.Tensor, settings: L0Settings) -> list[float]:
    """The polish's L0 weight of each image, from its luminance noise ``sigma`` (N,) and ``blocky`` (N,) bool.

    ``settings.polish_lambda_per_sigma`` · σ, kept between ``settings.polish_lambda``
    and ``POLISH_LAMBDA_RISE`` times it: nearly clean photographs keep the
    weak prior that lets the kernel settle where the pyramid's strong one
    biased it; under noise a weak prior lets the noise into the latent's
    edges, and the kernel fitted to them comes out worse (on the colour 1 %
    benchmark, similarity 0.620 at 1e-4, 0.650 at 2e-4). JPEG-compressed
    images (``blocky``) get ``JPEG_POLISH_LAMBDA`` times ``polish_lambda``
    whatever their noise reads (the noise floor they are given is a guess).
    Plain floats, so an image at the floor runs exactly the schedule a fixed
    weight gives.
    """
    floor, per_sigma = settings.polish_lambda, settings.polish_lambda_per_sigma
    # σ ≥ 0, so a per-σ weight of 0 (the rule off) leaves every uncompressed image at the floor
    return [floor * JPEG_POLISH_LAMBDA if compressed else min(max(per_sigma * value, floor), floor * POLISH_LAMBDA_RISE)
            for value, compressed in zip(sigma.tolist(), blocky.tolist(), strict=True)]


def polish_penalty(y: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None,
                   sigma: torch.Tensor | None = None) -> float | torch.Tensor:
    """The polish's kernel penalty γ for luminance images ``y`` (N, 1, H, W): a float, or (N, 1, 1, 1).

    ``settings.polish_gamma`` when set; otherwise ``POLISH_GAMMA_PER_SIGMA``
    times the measured noise, within ``POLISH_GAMMA_RANGE``. On a nearly clean
    photograph the data pins the kernel down and a weaker penalty lets its
    faint tails through; under noise the penalty keeps them from filling with it.
    ``sigma`` (N,) is the measured noise when the caller has already read it.
    """
    if settings.polish_gamma > 0:
        return settings.polish_gamma
    sigma = noise_sigma(y, known) if sigma is None else sigma
    return (POLISH_GAMMA_PER_SIGMA * sigma).clamp(*POLISH_GAMMA_RANGE).view(-1, 1, 1, 1)


def polish_softness(y: torch.Tensor, settings: L0Settings, known: torch.Tensor | None = None,
                    sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Edge softness in pixels (N, 1, 1, 1) the polish assumes for luminance images ``y`` (N, 1, H, W).

    The L0 latent is piecewise flat, its edges ideal steps; a natural
    photograph's edges are a fraction of a pixel soft, and a kernel fitted to
    the steps takes that softness up as width across its path, which costs
    several dB once the noise is low (bench/RESULTS.md, 2026-12-04).
    ``settings.polish_softness`` on images whose measured noise is at or below
    the polish penalty's floor, fading linearly to 0 where the penalty is
    capped: under noise the penalty smooths the kernel more than this does.
    ``sigma`` (N,) is the measured noise when the caller has already read it.
    """
    n = y.shape[0]
    if settings.polish_softness <= 0:
        return y.new_zeros(n, 1, 1, 1)
    low, high = (g / POLISH_GAMMA_PER_SIGMA for g in POLISH_GAMMA_RANGE)
    sigma = noise_sigma(y, known) if sigma is None else sigma
    share = ((high - sigma) / (high - low)).clamp(0.0, 1.0)
    return (settings.polish_softness * share).view(n, 1, 1, 1)


def refit_kernels(y: torch.Tensor, kernels: torch.Tensor, settings: L0Settings,
                  known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels (N, side, side) for luminance ``y`` (N, 1, H, W) refitted to the TV restoration they give.

    The pyramid and the polish fit the kernel to an L0 latent image, which is
    piecewise flat with ideal step edges; the scene's own edges are a little
    soft, so the fitted kernel takes that softness on and comes out a fraction
    of a pixel too wide. Deconvolved with it, the output is over-sharpened
    and rings faintly: at 0.1 % noise the true kernels gain 4 dB more than
    those estimates of 0.85-0.95 similarity. Each of ``settings.refit_iterations``
    rounds restores ``y`` with the final step's TV prior and weight
    (:func:`sparse_deconv`, unknown boundaries, so the restoration keeps the
    scene's edge profiles and texture), then fits the kernel to it by
    conjugate gradients (:func:`masked_kernel_step`, warm-started) over the
    pixels whose whole kernel window lies inside the image and whose data is
    ``known``, and prunes and centres it.

    The kernel penalty follows the noise-to-signal ratio, γ =
    ``settings.refit_gamma_per_nsr`` · σ² / e with σ the measured noise and e
    the restoration's mean squared gradient: a clean, detailed image lets the
    data decide, a noisier one needs a firmer penalty to keep the noise out of
    the kernel. Where γ would exceed ``REFIT_GAMMA_MAX`` (σ²/e above 0.01:
    most photographs under 1 % noise, flat ones under less) the penalty that
    keeps the noise out also spreads the kernel, and the refit was a coin flip
    on the benchmark (up to ±5 dB on single images): those images keep their
    kernels, as do those whose refitted kernel no longer agrees with the
    polished one at ``REFIT_MIN_AGREEMENT`` (a new shape, not a correction of
    its width). Returns the kernels and which of them were refitted (N,).
    Measured in bench/RESULTS.md.
    """
    n, side = kernels.shape[0], kernels.shape[-1]
    r = side // 2
    h, w = y.shape[-2:]
    none = torch.zeros(n, dtype=torch.bool, device=y.device)
    if settings.refit_iterations <= 0 or min(h, w) <= 2 * r + 4:
        return kernels, none
    lam = prior_weight(y, settings, known)
    sigma = noise_sigma(y, known).view(n, 1, 1)

    def penalty(latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        gx, gy = grad(latent)
        energy = (gx[..., :-1, :-1] ** 2 + gy[..., :-1, :-1] ** 2).flatten(1).mean(dim=1).view(-1, 1, 1)
        return settings.refit_gamma_per_nsr * sigma**2 / energy.clamp(min=1e-8)

    latent = sparse_deconv(y, kernels, lam, alpha=1.0, known=known)
    gamma = penalty(latent, sigma)
    rows = (gamma.flatten() <= REFIT_GAMMA_MAX).nonzero().flatten()
    if rows.numel() == 0:
        return kernels, none
    y, k, latent, gamma, sigma = y[rows], kernels[rows], latent[rows], gamma[rows], sigma[rows]
    known = _rows(known, rows)
    lam = lam[rows] if isinstance(lam, torch.Tensor) else lam
    size = (fft_size(h + side), fft_size(w + side))
    frame = y.new_zeros(rows.numel(), 1, *size)
    observed = frame.clone()
    observed[..., :h, :w] = y
    valid = frame.clone()
    valid[..., r + 1:h - r - 1, r + 1:w - r - 1] = 1.0
    if known is not None:
        valid[..., :h, :w] *= erode_mask(known, 1)
    for round_ in range(settings.refit_iterations):
        if round_ > 0:
            latent = sparse_deconv(y, k, lam, alpha=1.0, known=known)
            gamma = penalty(latent, sigma).clamp(max=REFIT_GAMMA_MAX)
        padded = frame.clone()
        padded[..., :h, :w] = latent
        raw = masked_kernel_step(grad(padded), observed, valid, k, gamma, REFIT_CG)
        k = centre_kernel(prune_kernel(raw, settings.kernel_cut, settings.kernel_noise), settings.centre)
    k = finish_kernel(k, side, settings)
    kept = kernel_agreement(k, kernels[rows]) >= REFIT_MIN_AGREEMENT
    out = kernels.clone()
    out[rows[kept]] = k[kept]
    refitted = none.clone()
    refitted[rows[kept]] = True
    return out, refitted


def rank_candidates(window: torch.Tensor, settings: L0Settings, side: int, known: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every candidate estimate for ``window`` (N, 1, H, W), ranked per image by how well it explains it.

    Returns the kernels (K, N, side, side) of the first ``settings.candidates``
    variants of :data:`CANDIDATES`, their estimates one level before the last
    (same shape) and, per image, the variant indices (N, K) ordered from the
    smallest residual to the largest (see :func:`best_estimate`). With one
    candidate nothing is scored.
    """
    n = window.shape[0]
    count = max(1, min(settings.candidates, len(CANDIDATES)))
    if count == 1:  # the estimator as configured (by default the classic one, CANDIDATES[0])
        kernels, previous = estimate_kernels(window, settings, side, known)
        return kernels[None], previous[None], torch.zeros(n, 1, dtype=torch.long, device=window.device)
    sigma = noise_sigma(window, known).clamp(min=GUARD_NOISE_FLOOR)
    scoring = replace(settings, lambda_per_sigma=settings.lambda_per_sigma * settings.select_weight,
                      final_lambda=settings.final_lambda * settings.select_weight)
    all_kernels, all_previous = estimate_variants(window, settings, side, known, CANDIDATES[:count])
    # every candidate's restoration in one batch of K·N images (row c·N + i: candidate c of image i)
    windows, windows_known = repeat_batch(window, count), repeat_batch(known, count)
    kernels = all_kernels.flatten(0, 1)
    latent = final_deconvolution(windows, kernels, scoring, windows_known).clamp(0.0, 1.0)
    scores = explained_residual(windows, latent, kernels, windows_known).view(count, n) / sigma
    # stable: on a tie the earlier variant ranks first, as the strict comparison did before
    order = scores.t().argsort(dim=1, stable=True)
    return all_kernels, all_previous, order


def trust(agreement: torch.Tensor, residual_ratio: torch.Tensor, centred: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Whether each kernel estimate is believable (N,) bool.

    A collapsed estimate shows as a kernel that changed shape at the last
    pyramid level (low agreement with the level before), or a restoration
    that, blurred again, no longer explains the input within a few noise
    levels (``residual_ratio`` = residual RMS / noise RMS). ``centred``
    (:func:`centring`), when given, also rejects a restoration that lines up
    with its input far better at some shift than where it is: the scene moved.
    """
    ok = (agreement >= GUARD_MIN_AGREEMENT) & (residual_ratio <= GUARD_MAX_RESIDUAL)
    return ok if centred is None else ok & (centred >= GUARD_MIN_CENTRED)


def edge_share_along(latent: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Share (N,) of the gradient energy of ``latent`` (N, 1, H, W) in edges crossing the long axis of kernels ``k``.

    The axis ``u`` is the major eigenvector of each kernel's second moments
    of mass; the share is ``Σ (∇x · u)² / Σ |∇x|²`` over the image (its
    circular wrap left out): the energy of the edges that cross the axis,
    which are the ones a blur along it smears. About 0.5 when edges run
    every way, near 0 when they all run along the axis.
    """
    mass, dy, dx = centred_coordinates(k)
    cxx, cyy, cxy = ((mass * a * b).sum(dim=(1, 2)) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    angle = 0.5 * torch.atan2(2.0 * cxy, cxx - cyy)
    gx, gy = grad(latent)
    gx, gy = gx[..., :-1, :-1].flatten(1), gy[..., :-1, :-1].flatten(1)
    along = (gx * torch.cos(angle)[:, None] + gy * torch.sin(angle)[:, None]).pow(2).sum(dim=1)
    return along / (gx * gx + gy * gy).sum(dim=1).clamp(min=1e-12)


def unconstrained_length(k: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Whether each estimate (N, side, side) stretched along edges that cannot measure it -> (N,) bool.

    A blur is measured by the edges that cross it: edges parallel to it look
    the same however long it is. On a photograph whose restored edges
    (``latent``, (N, 1, H, W)) run mostly along the kernel's long axis
    (:func:`edge_share_along` under ``UNCONSTRAINED_ALONG``), the estimate can
    grow along that axis and still explain the input; when it has also grown
    to within ``UNCONSTRAINED_FILL`` px of its window, it is taken to have
    done so (grey benchmark, seed 4: a rocket and its tower under a 17-px
    vertical shake, estimated 32-34 px long by every candidate, −5.55 dB with a
    residual of 0.45 noise levels). Kernels that fill the window on photographs
    with edges across them are not touched.
    """
    fills = kernel_extent(k) >= k.shape[-1] - UNCONSTRAINED_FILL
    return fills & (edge_share_along(latent, k) < UNCONSTRAINED_ALONG)


def _span(mask: torch.Tensor) -> torch.Tensor:
    """Length of the run from the first to the last True along dim 1 of (N, L)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, idx, mask.shape[1]).amin(dim=1)
    last = torch.where(mask, idx, -1).amax(dim=1)
    return (last - first + 1).clamp(min=0)


class L0BlindModel(RestorationModel):
    """``l0-blind``: blind kernel estimation with the L0 gradient prior, then deconvolution."""

    channels = None

    def __init__(self, params: Mapping[str, object], device: torch.device) -> None:
        info = REGISTRY.get("l0-blind")
        resolved = {p.name: p.default for p in info.params}
        resolved.update(params)
        super().__init__(info, resolved, device)
        p = self.params
        self.settings = L0Settings(
            kernel=int(p["kernel"]),  # type: ignore[call-overload]
            lam=float(p["lambda"]),  # type: ignore[arg-type]
            iterations=int(p["iterations"]),  # type: ignore[call-overload]
            final=str(p["final"]),
            final_lambda=float(p["final_lambda"]),  # type: ignore[arg-type]
            guard=bool(p["guard"]),
            candidates=int(p["candidates"]),  # type: ignore[call-overload]
            polish_iterations=int(p["polish"]),  # type: ignore[call-overload]
            polish_softness=float(p["softness"]),  # type: ignore[arg-type]
            refit_iterations=int(p["refit"]),  # type: ignore[call-overload]
            saturation=float(p["saturation"]),  # type: ignore[arg-type]
            defocus=bool(p["defocus"]),
            light=str(p["light"]),
        )

    def restore_batch(self, x: torch.Tensor) -> Restored:
        """Restore each image of ``x`` as it would be restored alone.

        :func:`restore` chooses one estimation window position and one kernel side for its whole batch, so an
        image's result would depend on what else shares its batch: a wide blur in one image would widen every
        image's kernel window. Each image gets its own call here; each call still estimates its image's
        candidates as one batch (the work a GPU runs in parallel).
        """
        if x.shape[0] == 1:
            return restore(x, self.settings)
        return concat_restored([restore(x[i:i + 1], self.settings) for i in range(x.shape[0])])


def build_l0_blind(params: Mapping[str, object], device: torch.device) -> L0BlindModel:
    """Factory named in the catalog for ``l0-blind``."""
    return L0BlindModel(params, device)
