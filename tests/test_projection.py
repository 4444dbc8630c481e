"""Projection mode: the output has no component along the directions, and applying it twice changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, make_sae

from hf_concept_ablation.adapter.layer import ConceptAblationLayer, orthonormal_basis


def _x() -> torch.Tensor:
    return torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_no_component_along_sae_decoder_rows_and_idempotent():
    sae = make_sae("jumprelu").double()
    latents = [4, 9, 100, 200]
    layer = ConceptAblationLayer.from_sae(sae, latents, mode="projection", dtype=torch.float64)
    x = _x()
    once = layer(x)
    assert (once @ sae.W_dec[latents].T).abs().max() < 1e-10
    torch.testing.assert_close(layer(once), once, rtol=0, atol=1e-12)
    # the part removed lies in the span of the directions: what remains of x is unchanged
    residual = x - once
    basis = orthonormal_basis(sae.W_dec[latents].detach())
    torch.testing.assert_close(residual, (x @ basis) @ basis.T)


def test_dependent_directions_are_reduced_to_an_orthonormal_basis():
    d = torch.randn(2, HIDDEN, dtype=torch.float64)
    directions = torch.stack([d[0], d[1], d[0] + 2 * d[1]])
    q = orthonormal_basis(directions)
    assert q.shape == (HIDDEN, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64))
    layer = ConceptAblationLayer.from_directions(directions, dtype=torch.float64)
    out = layer(_x())
    assert (out @ directions.T).abs().max() < 1e-10


def test_strength_scales_the_removed_part_and_keep_mask_leaves_positions_alone():
    layer = ConceptAblationLayer.from_directions(torch.randn(3, HIDDEN, dtype=torch.float64), dtype=torch.float64)
    x = _x()
    full = x - layer(x)
    layer.set_alpha(0.25)
    torch.testing.assert_close(x - layer(x), 0.25 * full)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[:, 0] = False
    torch.testing.assert_close(layer(x, keep)[:, 0], x[:, 0])


def test_mean_ablation_sets_the_component_to_the_centers_and_keeps_the_rest():
    directions = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    center = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    layer = ConceptAblationLayer.from_directions(directions, dtype=torch.float64, center=center)
    x = _x()
    out = layer(x)
    # along the directions every position now sits where the center does
    torch.testing.assert_close(out @ directions.T, (center @ directions.T).expand(3, 7, 2))
    # orthogonal to them nothing moved, and applying it again changes nothing
    basis = orthonormal_basis(directions)
    rest = lambda t: t - (t @ basis) @ basis.T  # noqa: E731
    torch.testing.assert_close(rest(out), rest(x))
    torch.testing.assert_close(layer(out), out)
    # a center already orthogonal to the span is the same as zero ablation
    zero = ConceptAblationLayer.from_directions(directions, dtype=torch.float64)
    torch.testing.assert_close(
        ConceptAblationLayer.from_directions(directions, dtype=torch.float64, center=rest(center))(x), zero(x))


def test_center_of_the_wrong_size_is_named():
    import pytest

    with pytest.raises(ValueError, match=r"center has shape \(3,\), expected \[64\]"):
        ConceptAblationLayer.from_directions(torch.randn(2, HIDDEN), center=torch.zeros(3))


def test_a_projection_saved_without_a_center_is_zero_ablation():
    """Adapters saved before mean ablation existed hold only ``Q``."""
    q = orthonormal_basis(torch.randn(2, 8)).float()
    old = ConceptAblationLayer.from_state("projection", {"Q": q})
    assert torch.equal(old.center, torch.zeros(8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(old(x), x - (x @ q) @ q.T)
    with pytest.raises(ValueError, match=r"needs tensors \['Q'\]"):
        ConceptAblationLayer.from_state("projection", {"center": torch.zeros(8)})
