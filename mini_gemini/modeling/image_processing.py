"""Image -> the two tensors MGM reads. One path for the CLI, the app, the API and training.

`pad`: pad to a square with the processor's mean colour, resize to the HR side with CLIP's processor,
(bicubic PIL; the pad + resize runs as `padded_square_resize`: the same bytes without building the
padded canvas, so memory follows the HR side and not the upload - see mini_gemini/inputs/padding.py),
then derive the LR views from that HR tensor by bilinear interpolation (so both see the same pixels).
HD (image_grid = 2): the LR image is 2 x 2 crops of 336 plus a global 336 downscale, global first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..inputs.padding import expand_to_square, padded_square_resize  # noqa: F401 - re-exported
from .grid import grid_crops

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Views:
    pixel_values: torch.Tensor      # (V, 3, S, S) LR views, model order (HD: global, then the grid row-major)
    pixel_values_aux: torch.Tensor  # (3, S_aux, S_aux) the HR image


class ImageProcessor:
    """Image -> the model's two inputs, as the official "pad" preprocessing makes them (DESIGN.md 1.4):
    pad to a square with the mean colour (mean x 255), resize to the HR size with CLIP's processor
    (bicubic, CLIP mean/std), and take the LR views by bilinear interpolation of that HR tensor (HD: a 2x2
    grid of crops row-major, after a global view).

    Args:
        lr_size: side of one LR view in pixels (336; the HD image is grid x lr_size).
        hr_size: side of the HR image (`image_size_aux`: 768, 1536 in HD).
        grid / global_view: HD layout (`image_grid`, `image_global`).
        mean / std: normalisation per channel (CLIP's by default).

    Calling it on a PIL image returns `Views(pixel_values (V, 3, S, S), pixel_values_aux (3, S_aux, S_aux))`,
    float32; memory and time depend on the HR size only, not on the upload's size.
    """

    def __init__(self, lr_size: int, hr_size: int, grid: int = 1, global_view: bool = False,
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.lr_size, self.hr_size, self.grid = lr_size, hr_size, grid
        self.global_view = global_view and grid > 1
        self.mean, self.std = tuple(mean), tuple(std)
        self.clip = CLIPImageProcessorPil(size={"shortest_edge": hr_size},
                                          crop_size={"height": hr_size, "width": hr_size},
                                          image_mean=list(mean), image_std=list(std))

    @classmethod
    def from_config(cls, config) -> "ImageProcessor":
        return cls(config.lr_size, config.image_size_aux, config.image_grid, config.image_global)

    @property
    def fill(self):
        return tuple(int(m * 255) for m in self.mean)

    def pad(self, img: Image.Image) -> Image.Image:
        return expand_to_square(img.convert("RGB"), self.fill)

    def hr_image(self, img: Image.Image) -> Image.Image:
        """The padded square resized to hr x hr: == CLIP's bicubic resize of self.pad(img), bit for bit
        (the tall-panorama exception is documented in inputs/padding.py), in memory bounded by hr."""
        return padded_square_resize(img, self.hr_size, self.fill)

    def normalize(self, hr_img: Image.Image) -> torch.Tensor:
        """What CLIP's processor does to an hr x hr RGB image (its resize and centre crop are then the
        identity): transformers' numpy rescale (uint8 -> float64 x rescale_factor -> float32) and
        normalize ((x - mean) / std in float32). Every pixel value maps through the same float ops, so a
        256-entry table per channel gives the same floats without the float64 copies of the HR image."""
        clip = self.clip
        x = (np.arange(256, dtype=np.float64) * clip.rescale_factor).astype(np.float32)
        mean = np.asarray(clip.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(clip.image_std, dtype=np.float32)[:, None]
        table = (x[None, :] - mean) / std  # (3, 256) float32
        pixels = np.asarray(hr_img if hr_img.mode == "RGB" else hr_img.convert("RGB"))
        out = torch.empty((3,) + pixels.shape[:2], dtype=torch.float32)
        for r in range(0, pixels.shape[0], 128):  # in row bands: no full-size index or float temporaries
            for c in range(3):
                out[c, r:r + 128] = torch.from_numpy(np.take(table[c], pixels[r:r + 128, :, c]))
        return out

    def __call__(self, img: Image.Image) -> Views:
        hr = self.normalize(self.hr_image(img))
        g, s = self.grid, self.lr_size
        lr = F.interpolate(hr[None], size=(s * g, s * g), mode="bilinear", align_corners=False)
        if g == 1:
            return Views(pixel_values=lr, pixel_values_aux=hr)
        crops = grid_crops(lr, g)[0]  # (g*g, 3, s, s), row-major
        if self.global_view:
            glob = F.interpolate(lr, size=(s, s), mode="bilinear", align_corners=False)
            crops = torch.cat([glob, crops])
        return Views(pixel_values=crops.contiguous(), pixel_values_aux=hr)

    def batch(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        views = [self(im) for im in images]
        return torch.stack([v.pixel_values for v in views]), torch.stack([v.pixel_values_aux for v in views])
