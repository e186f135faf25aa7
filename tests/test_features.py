"""Patch features: shapes, and equality with the official unfold-then-pool computation."""

import pytest
import torch
import torch.nn.functional as F

from patchcore_core.features import PatchFeatureAggregator, adaptive_pool_matrix


def unfold_reference(maps, pretrain_dim, target_dim, patch_size=3):
    """The official PatchCore path: unfold 3×3 patches, upsample them, pool each flattened patch, stack, pool."""
    ref_hw = maps[0].shape[-2:]
    pooled = []
    for fmap in maps:
        b, c, h, w = fmap.shape
        patches = F.unfold(fmap, patch_size, padding=patch_size // 2).reshape(b, c * patch_size**2, h, w)
        if (h, w) != tuple(ref_hw):
            patches = F.interpolate(patches, size=ref_hw, mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * patch_size**2)  # 9x memory, on purpose here
        pooled.append(F.adaptive_avg_pool1d(flat, pretrain_dim).squeeze(1))
    stacked = torch.stack(pooled, 1).reshape(-1, 1, len(maps) * pretrain_dim)
    return F.adaptive_avg_pool1d(stacked, target_dim).squeeze(1)


@pytest.mark.parametrize("patch_size", [1, 3, 5])
@pytest.mark.parametrize(("channels", "pretrain", "target"), [((64, 128), 32, 48), ((40, 112), 8, 16)])
def test_pooling_equals_unfold_reference(patch_size, channels, pretrain, target):
    torch.manual_seed(0)
    maps = [torch.randn(2, channels[0], 8, 8), torch.randn(2, channels[1], 4, 4)]
    feats, grid = PatchFeatureAggregator(list(channels), patch_size, pretrain, target)(maps)
    assert grid == (8, 8)
    assert feats.shape == (2, 64, target)
    expected = unfold_reference(maps, pretrain, target, patch_size)
    torch.testing.assert_close(feats.reshape(-1, target), expected, atol=1e-5, rtol=1e-5)


def test_pretrain_dim_above_channels_matches_reference_when_pooled_per_channel():
    """With pretrain_dim > C the official code pools partial 3×3 neighbourhoods; with patch_size 1 both agree."""
    torch.manual_seed(1)
    maps = [torch.randn(1, 40, 6, 6), torch.randn(1, 112, 3, 3)]
    feats, _ = PatchFeatureAggregator([40, 112], 1, 112, 224)(maps)
    torch.testing.assert_close(feats.reshape(-1, 224), unfold_reference(maps, 112, 224, 1), atol=1e-5, rtol=1e-5)


def test_adaptive_pool_matrix_is_the_pooling_operator():
    x = torch.randn(5, 37, dtype=torch.float64)
    for out_dim in (7, 37, 50):
        expected = F.adaptive_avg_pool1d(x.unsqueeze(1), out_dim).squeeze(1)
        torch.testing.assert_close(x @ adaptive_pool_matrix(37, out_dim), expected)


def test_even_patch_size_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        PatchFeatureAggregator([8], patch_size=2, pretrain_dim=8, target_dim=8)
