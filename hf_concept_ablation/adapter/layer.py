"""The ablation module: removes concepts from one decoder layer's output.

One class per kind of removal, all of the form ``x' = x - alpha * r(x)`` at positions that
are not left alone, behind the base `ConceptAblationLayer` (strength, positions, dtype, saving):

* ``relu`` / ``jumprelu`` (latent mode, exact and sparse): ``r(x) = f_S(x) @ W_dec[S]``
  with ``f_S`` computed from only the selected encoder columns. This equals a full
  SAE encode, zeroing of ``S``, decode, plus the (non-detached) error term.
* ``topk`` (latent mode for TopK SAEs): which latents fire depends on all of them,
  so the full encoder is kept; only ``W_dec[S]`` is used for the removal.
* ``projection``: ``r(x) = ((x - c) @ Q) @ Q.T`` with ``Q`` an orthonormal basis of the
  directions (SAE decoder rows or explicit directions such as PCA components) and ``c``
  a center: zero (zero ablation) or the mean activation (mean ablation: the component
  along the directions is set to the mean's instead of to zero).
* ``leace``: an oblique eraser ``r(x) = ((x - b) @ R.T) @ L.T`` with ``L`` ``[d_model, r]`` and ``R``
  ``[r, d_model]``, as fitted by ``concept_erasure.LeaceFitter`` (LEACE: no linear probe can recover
  the concept from the erased activations it was fitted on; the mean ``b`` is kept).

Tensors are buffers (never parameters), non-persistent so they stay out of the
base model's ``state_dict``; `ConceptAblation.save_pretrained` stores them apart.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Sequence

import torch
from sae_lens import SAE
from torch import nn

from ..checks import check_number
from .sae_sources import PER_LATENT_ARCHITECTURES, TOPK_ARCHITECTURES


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor in transformers 5.x, a tuple in 4.x)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden state replaced, in the same form (tensor or tuple)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def special_token_ids(source: Any) -> list[int]:
    """BOS and padding token ids of a tokenizer or model config: positions that are never ablated or counted."""
    return sorted({i for i in (source.bos_token_id, source.pad_token_id) if isinstance(i, int)})


def keep_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, skip_ids: Sequence[int]) -> torch.Tensor:
    """``[batch, seq]`` bool: true where the token is not in `skip_ids` and not masked out.

    A 2-D `attention_mask` longer than `input_ids` (generation with a KV cache) is
    aligned on its last columns.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if skip_ids:
        keep &= ~torch.isin(input_ids, torch.tensor(list(skip_ids), device=input_ids.device))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        keep &= attention_mask[:, -input_ids.shape[1]:].bool()
    return keep


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming `what` if `tensor` holds NaN or infinite values."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} hold NaN or infinite values")


def _check_shapes(kind: str, buffers: dict[str, tuple[str, ...]], tensors: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first tensor whose shape disagrees with the kind's dimensions (`buffers`) as the
    tensors before it set them, e.g. a ``W_enc`` of 1 latent beside a ``W_dec`` of 2."""
    sizes: dict[str, int] = {}
    for name, dims in buffers.items():
        shape = tuple(tensors[name].shape)
        if len(shape) != len(dims) or any(sizes.setdefault(dim, size) != size for dim, size in zip(dims, shape)):
            expected = ", ".join(f"{dim}={sizes[dim]}" if dim in sizes else dim for dim in dims)
            raise ValueError(f"{kind} ablation tensor {name} has shape {list(shape)}, expected [{expected}]")


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[d_model, r]`` of the span of `directions` ``[n, d_model]`` (QR, rank-checked)."""
    if directions.ndim != 2 or directions.shape[0] == 0:
        raise ValueError(f"directions must have shape [n, d_model] with n >= 1, got {tuple(directions.shape)}")
    _check_finite(directions, "directions")
    q, r = torch.linalg.qr(directions.T.to(torch.float64))
    diag = r.diagonal().abs()
    if not bool(diag.max() > 0):
        raise ValueError("directions are all zero: they span nothing to ablate")
    keep = diag > diag.max() * 1e-6
    if not bool(keep.all()):
        q = q[:, keep]  # drop dependent directions so Q stays orthonormal
    return q.contiguous()  # QR returns column-major storage


class ConceptAblationLayer(nn.Module):
    """Removes the selected concepts from a residual-stream tensor ``[..., d_model]``.

    The base of one class per kind (`KINDS`); build one with `from_sae`, `from_directions`,
    `from_eraser`, or `from_state` (a kind's saved tensors). `forward(x, keep)` returns the
    ablated tensor, where ``keep`` (``[batch, seq]`` bool, optional) marks the positions to ablate.
    """

    kind: ClassVar[str]
    #: the kind's tensors and their dimensions: ``n`` latents or directions removed, ``d_sae`` the SAE's full width
    BUFFERS: ClassVar[dict[str, tuple[str, ...]]]
    #: tensors checked to be finite, and how errors name them
    FINITE: ClassVar[dict[str, str]] = {}
    _registry: ClassVar[dict[str, type[ConceptAblationLayer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            ConceptAblationLayer._registry[cls.kind] = cls

    def __init__(self, tensors: dict[str, torch.Tensor], k: int | None = None) -> None:
        super().__init__()
        missing = [name for name in self.BUFFERS if name not in tensors]
        if missing:
            raise ValueError(f"ablation kind {self.kind!r} needs tensors {missing}")
        _check_shapes(self.kind, self.BUFFERS, tensors)
        for name, what in self.FINITE.items():
            _check_finite(tensors[name], what)
        self.k = k
        for name in self.BUFFERS:
            self.register_buffer(name, tensors[name], persistent=False)
        self.register_buffer("alpha", torch.ones((), dtype=torch.float32), persistent=False)

    @classmethod
    def from_state(cls, kind: str, tensors: dict[str, torch.Tensor], k: int | None = None) -> ConceptAblationLayer:
        """The ablation of `kind` (one of `KINDS`) made of its saved `tensors` (`state_tensors`), and `k` for topk."""
        if kind not in cls._registry:
            raise ValueError(f"unknown ablation kind {kind!r}; expected one of {KINDS}")
        return cls._registry[kind](tensors, k=k)

    @classmethod
    def from_sae(
        cls, sae: SAE, latents: Sequence[int], mode: str, dtype: torch.dtype = torch.float32,
        center: torch.Tensor | None = None,
    ) -> ConceptAblationLayer:
        """Slice what the ablation of `latents` needs out of a sae-lens SAE (`center`: projection mode only)."""
        ids = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)
        W_dec = sae.W_dec.detach()[ids].to(dtype)
        if mode == "projection":
            return cls.from_directions(W_dec, dtype=dtype, center=center)
        if center is not None:
            raise ValueError("a center applies to projection mode only")
        architecture = sae.cfg.architecture()
        b_in = sae.b_dec.detach() * float(sae.cfg.apply_b_dec_to_input)
        if architecture in PER_LATENT_ARCHITECTURES:
            tensors = {"W_enc": sae.W_enc.detach()[:, ids], "b_enc": sae.b_enc.detach()[ids], "b_in": b_in,
                       "W_dec": W_dec}
            kind = ReLULatentAblation
            if architecture == "jumprelu":
                tensors["threshold"] = sae.threshold.detach()[ids]
                kind = JumpReLULatentAblation
            return kind({name: t.to(dtype).clone() for name, t in tensors.items()})
        if architecture in TOPK_ARCHITECTURES:
            rescale = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
            norm = sae.W_dec.detach().norm(dim=-1) if rescale else torch.ones(sae.cfg.d_sae, device=ids.device)
            tensors = {
                "W_enc": sae.W_enc.detach().to(dtype).clone(),
                "b_enc": sae.b_enc.detach().to(dtype).clone(),
                "b_in": b_in.to(dtype).clone(),
                "W_dec": W_dec,
                "latent_ids": ids.clone(),
                "decoder_norm": norm.to(dtype).clone(),
            }
            return TopKLatentAblation(tensors, k=int(sae.cfg.k))
        raise ValueError(f"cannot ablate latents of a {architecture!r} SAE")

    @classmethod
    def from_directions(cls, directions: torch.Tensor, dtype: torch.dtype = torch.float32,
                        center: torch.Tensor | None = None) -> ConceptAblationLayer:
        """A projection ablation of explicit directions ``[n, d_model]`` (e.g. principal components).

        `center` ``[d_model]``: the point whose component along the directions is kept (e.g.
        the mean activation, for mean ablation); None means zero.
        """
        q = orthonormal_basis(directions.detach()).to(dtype)
        center = q.new_zeros(q.shape[0]) if center is None else center.detach().to(q.device, dtype).clone()
        if center.shape != (q.shape[0],):
            raise ValueError(f"center has shape {tuple(center.shape)}, expected [{q.shape[0]}] (d_model)")
        return ProjectionAblation({"Q": q, "center": center})

    @classmethod
    def from_eraser(cls, proj_left: torch.Tensor, proj_right: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> ConceptAblationLayer:
        """A ``leace`` ablation from the factors of a ``concept_erasure.LeaceEraser`` (``x - ((x - bias) @
        proj_right.T) @ proj_left.T``), stored at its rank: ``proj_left @ proj_right`` is refactored by SVD and
        only its nonzero singular directions are kept (the library pads the factors with zero columns)."""
        product = proj_left.detach().to(torch.float64) @ proj_right.detach().to(torch.float64)
        _check_finite(product, "eraser factors")
        u, s, vh = torch.linalg.svd(product)
        keep = s > (s.max() * 1e-7 if bool(s.max() > 0) else 1.0)
        if not bool(keep.any()):
            raise ValueError("the eraser removes nothing (its projection is the identity): was it fitted on labels "
                             "that vary?")
        bias = torch.zeros(product.shape[0], dtype=torch.float64) if bias is None else bias.detach()
        tensors = {"proj_left": u[:, keep] * s[keep], "proj_right": vh[keep], "bias": bias}
        return LeaceAblation({name: t.to(dtype).contiguous() for name, t in tensors.items()})

    @property
    def d_model(self) -> int:
        """Size of the residual stream this layer expects."""
        raise NotImplementedError

    @property
    def num_directions(self) -> int:
        """Number of latents, (orthonormalized) directions or eraser ranks removed."""
        raise NotImplementedError

    def removed_part(self, x: torch.Tensor) -> torch.Tensor:
        """What the ablation subtracts from `x` at full strength."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Return `x` with the concepts removed at the positions where `keep` is true."""
        compute_dtype = self._buffers[next(iter(self.BUFFERS))].dtype
        removed = self.removed_part(x.to(compute_dtype)) * self.alpha.to(compute_dtype)
        if keep is not None:
            removed = removed * keep.unsqueeze(-1).to(compute_dtype)
        return x - removed.to(x.dtype)

    def set_alpha(self, alpha: float) -> None:
        """Set the strength in place (``fill_``, so compiled graphs keep working)."""
        check_number(alpha, "ablation strength", 0, 1)
        self.alpha.fill_(float(alpha))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define this ablation (for saving)."""
        return {name: getattr(self, name) for name in self.BUFFERS}

    def metadata(self) -> str:
        """JSON string of the non-tensor state (kind, k), stored in the safetensors header."""
        return json.dumps({"kind": self.kind, "k": self.k})

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_model={self.d_model}, n={self.num_directions}, alpha={float(self.alpha):.3g}"


class LatentAblation(ConceptAblationLayer):
    """Latent mode: ``r(x) = f_S(x) @ W_dec[S]``, the selected latents' exact contribution."""

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[-1]

    @property
    def num_directions(self) -> int:
        return self.W_dec.shape[0]

    def latent_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``f_S(x)`` ``[..., |S|]`` of the selected latents."""
        raise NotImplementedError

    def removed_part(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent_activations(x) @ self.W_dec


class ReLULatentAblation(LatentAblation):
    """Latents of a ReLU SAE, from only their own encoder columns (sparse: the cost does not depend on the width)."""

    kind = "relu"
    BUFFERS = {"W_enc": ("d_model", "n"), "b_enc": ("n",), "b_in": ("d_model",), "W_dec": ("n", "d_model")}

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_in) @ self.W_enc + self.b_enc

    def latent_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._pre(x))


class JumpReLULatentAblation(ReLULatentAblation):
    """Latents of a JumpReLU SAE (Gemma Scope): ``relu(pre) * (pre > threshold)``."""

    kind = "jumprelu"
    BUFFERS = {**ReLULatentAblation.BUFFERS, "threshold": ("n",)}

    def latent_activations(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._pre(x)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)


class TopKLatentAblation(LatentAblation):
    """Latents of a TopK SAE: which latents fire depends on all of them, so the full encoder is kept."""

    kind = "topk"
    BUFFERS = {"W_enc": ("d_model", "d_sae"), "b_enc": ("d_sae",), "b_in": ("d_model",), "W_dec": ("n", "d_model"),
               "latent_ids": ("n",), "decoder_norm": ("d_sae",)}

    def __init__(self, tensors: dict[str, torch.Tensor], k: int | None = None) -> None:
        if not k:
            raise ValueError("a topk ablation needs k, the number of active latents")
        super().__init__(tensors, k=k)

    def latent_activations(self, x: torch.Tensor) -> torch.Tensor:
        pre = ((x - self.b_in) @ self.W_enc + self.b_enc) * self.decoder_norm
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return acts[..., self.latent_ids] / self.decoder_norm[self.latent_ids]


class ProjectionAblation(ConceptAblationLayer):
    """Projection mode: ``r(x) = ((x - c) @ Q) @ Q.T``, ``Q`` orthonormal, ``c`` the center (zero or the mean)."""

    kind = "projection"
    BUFFERS = {"Q": ("d_model", "n"), "center": ("d_model",)}
    FINITE = {"Q": "directions", "center": "center values"}

    def __init__(self, tensors: dict[str, torch.Tensor], k: int | None = None) -> None:
        if "Q" in tensors and "center" not in tensors:  # users' adapters saved before centers: zero ablation
            tensors = {**tensors, "center": tensors["Q"].new_zeros(tensors["Q"].shape[0])}
        super().__init__(tensors, k=k)

    @property
    def d_model(self) -> int:
        return self.Q.shape[0]

    @property
    def num_directions(self) -> int:
        return self.Q.shape[1]

    def removed_part(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.Q - self.center @ self.Q) @ self.Q.T


class LeaceAblation(ConceptAblationLayer):
    """A LEACE eraser: ``r(x) = ((x - b) @ R.T) @ L.T`` (``concept_erasure.LeaceEraser``, stored at its rank)."""

    kind = "leace"
    BUFFERS = {"proj_left": ("d_model", "n"), "proj_right": ("n", "d_model"), "bias": ("d_model",)}
    FINITE = {name: f"eraser {name} values" for name in BUFFERS}

    @property
    def d_model(self) -> int:
        return self.bias.shape[0]

    @property
    def num_directions(self) -> int:
        return self.proj_left.shape[1]

    def removed_part(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.bias) @ self.proj_right.T) @ self.proj_left.T


KINDS = tuple(ConceptAblationLayer._registry)


def full_sae_ablation(sae: SAE, latents: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """The naive reference: full SAE encode, zero `latents`, decode, add the (non-detached) error term.

    Equal to latent mode up to rounding, at the cost of the SAE's full width; used by the
    tests as ground truth and by the benchmarks as the baseline to beat.
    """
    acts = sae.encode(x)
    ablated = acts.clone()
    ablated[..., list(latents)] = 0.0
    return sae.decode(ablated) + (x - sae.decode(acts))
