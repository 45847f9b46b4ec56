"""Random augmentation of whole in-memory image batches, drawn per (seed, epoch, example index)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfer_cli.data.epoch_order import EpochOrder


class RandomResizedCropFlip:
    """timm's training crop and flip for whole float batches: one affine_grid + grid_sample, no per-example
    Python, no PIL.

    As timm's RandomResizedCropAndInterpolation with its defaults: a crop whose area is uniform in SCALE
    of the source image's, with aspect ratio log-uniform in RATIO, the first of TRIES candidates that
    fits in the image (all tried at once), else timm's fallback, the centred crop of the image's aspect
    ratio clamped into RATIO; its position is uniform. Then a horizontal flip with probability FLIP.
    Crop sizes are fractions of the source's size (timm rounds them to pixels). The crop is sampled
    bilinearly from the image already resized to the model's input size: the resize scales each axis,
    so a crop's fractions are the same on both.
    """

    SCALE = (0.08, 1.0)
    RATIO = (3 / 4, 4 / 3)
    TRIES = 10
    FLIP = 0.5
    #: uniform draws per example: TRIES (area, log ratio) pairs, then the crop's x and y and the flip
    DRAWS = 2 * TRIES + 3

    def __init__(self, source_size: tuple[int, int]):
        height, width = source_size
        self.aspect = width / height

    def draws(self, order: EpochOrder) -> torch.Tensor:
        """One row of uniforms per example index for the order's (seed, epoch)."""
        return torch.rand(order.num_samples, self.DRAWS, generator=order.augmentation_generator())

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self._theta(draws), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _theta(self, draws: torch.Tensor) -> torch.Tensor:
        """Per example the affine map from output to source coordinates (both in [-1, 1])."""
        tries = self.TRIES
        area = self.SCALE[0] + (self.SCALE[1] - self.SCALE[0]) * draws[:, :tries]
        low, high = math.log(self.RATIO[0]), math.log(self.RATIO[1])
        ratio = torch.exp(low + (high - low) * draws[:, tries:2 * tries])
        # crop width and height as fractions of the source's: w*h = area*W*H and w/h = ratio
        width, height = (area * ratio / self.aspect).sqrt(), (area / ratio * self.aspect).sqrt()
        fits = (width <= 1) & (height <= 1)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax gives the first of equal maxima
        found = fits.any(1)
        fallback_w = min(1.0, self.RATIO[1] / self.aspect)
        fallback_h = min(1.0, self.aspect / self.RATIO[0])
        width = torch.where(found, width.gather(1, first)[:, 0], fallback_w)
        height = torch.where(found, height.gather(1, first)[:, 0], fallback_h)
        # a uniform position puts the crop's centre uniformly in [-(1 - size), 1 - size]; the fallback is centred
        shift = torch.where(found[:, None], 2 * draws[:, 2 * tries:2 * tries + 2] - 1, 0.0)
        flip = torch.where(draws[:, -1] < self.FLIP, -1.0, 1.0)
        theta = torch.zeros(len(draws), 2, 3)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = (1 - width) * shift[:, 0]
        theta[:, 1, 1] = height
        theta[:, 1, 2] = (1 - height) * shift[:, 1]
        return theta
