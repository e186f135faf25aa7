"""Locally aware patch features (PatchCore §3.1): 3×3 neighbourhood averages of two backbone layers, on one grid.

Every step is linear, so the channel pooling is folded into one matrix per layer and applied on each layer's
native grid before the bilinear upsampling: the same result as the official unfold-then-pool code path
(exactly so when the pretrain dim divides the layer's channels), without materialising 9× unfolded patches.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def adaptive_pool_matrix(in_dim: int, out_dim: int) -> torch.Tensor:
    """The [in_dim, out_dim] matrix equal to `F.adaptive_avg_pool1d` from in_dim to out_dim values."""
    eye = torch.eye(in_dim, dtype=torch.float64).unsqueeze(1)  # [in, 1, in]: one basis vector per row
    return F.adaptive_avg_pool1d(eye, out_dim).squeeze(1)  # [in, out]


class PatchFeatureAggregator:
    """Turn backbone layer maps into one patch feature per position of the first (finest) layer's grid.

    Per layer: `patch_size`×`patch_size` average (stride 1, zero padding), channels adaptively pooled to
    `pretrain_dim`; layers bilinearly upsampled to the finest grid, stacked and pooled to `target_dim`.
    """

    def __init__(self, channels: list[int], patch_size: int = 3, pretrain_dim: int = 1024, target_dim: int = 1024):
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd positive integer, got {patch_size}")
        self.channels = list(channels)
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.projections = self._layer_projections()

    def _layer_projections(self) -> list[torch.Tensor]:
        """One [C_l, target_dim] matrix per layer: its pretrain pooling composed with its share of the final pooling."""
        n_layers = len(self.channels)
        final = adaptive_pool_matrix(n_layers * self.pretrain_dim, self.target_dim)
        mats = []
        for i, c in enumerate(self.channels):
            share = final[i * self.pretrain_dim : (i + 1) * self.pretrain_dim]
            mats.append((adaptive_pool_matrix(c, self.pretrain_dim) @ share).float())
        return mats

    @property
    def dim(self) -> int:
        return self.target_dim

    def __call__(self, layer_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """layer_maps: [B, C_l, h_l, w_l] finest first. Returns features [B, h*w, target_dim] and the grid (h, w)."""
        if len(layer_maps) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} layer maps, got {len(layer_maps)}")
        grid = tuple(layer_maps[0].shape[-2:])
        pad = self.patch_size // 2
        total = None
        for fmap, proj in zip(layer_maps, self.projections, strict=True):
            local = F.avg_pool2d(fmap.float(), self.patch_size, stride=1, padding=pad, count_include_pad=True)
            mixed = torch.einsum("bchw,cd->bdhw", local, proj.to(local.device))
            if tuple(mixed.shape[-2:]) != grid:
                mixed = F.interpolate(mixed, size=grid, mode="bilinear", align_corners=False)
            total = mixed if total is None else total + mixed
        b, d, h, w = total.shape
        return total.permute(0, 2, 3, 1).reshape(b, h * w, d).contiguous(), (h, w)
