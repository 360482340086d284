"""Building blocks shared by the three EsViT backbone families.

This module is part of the Hub-facing code (it is copied next to `modeling_esvit.py` by
`save_pretrained`), so it depends on torch only. Its one contract with `modeling_esvit.py` is
`EncoderOutput`: every backbone encoder (`backbone_swin.SwinEncoder`, `backbone_vil.VilEncoder`,
`backbone_cvt.CvtEncoder`) returns one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncoderOutput:
    """What a backbone encoder computes for one batch of equally sized images.

    Attributes:
        last_hidden_state: `[B, L, C]` last-stage region tokens after the final norm (global
            tokens excluded). L = 49 for a 224-px input, 9 for a 96-px one.
        pooler_output: `[B, C]` view-level feature: the mean of `last_hidden_state` over tokens,
            or, for ViL with a global token in the last stage, that token after the final norm.
        stage_outputs: per stage, `[B, L_i, C_i]` tokens at the end of the stage, before any
            downsampling and without the final norm (global tokens excluded); only when asked.
        stage_spatial_shapes: per stage, `(H_i, W_i)` with `H_i * W_i == L_i`; only when asked.
        embedding_output: `[B, L_0, C_0]` tokens entering the first block; only when asked.
        attentions: per block, the attention probabilities of the eager path (shape is the
            family's own, e.g. `[B * num_windows, heads, ws*ws, ws*ws]` for Swin); only when asked.
        block_features: per block, in order, `[B, C_i]`: the block's output averaged over its
            tokens (blocks of the last stage pass through the final norm first; family-specific
            rules, e.g. ViL's global token, apply). The linear-probe feature concatenates the last
            `n` of them; only when asked.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    stage_outputs: tuple[torch.Tensor, ...] | None = None
    stage_spatial_shapes: tuple[tuple[int, int], ...] | None = None
    embedding_output: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    block_features: tuple[torch.Tensor, ...] | None = None


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def prepare_encoder_inputs(
    pixel_values: torch.Tensor,
    *,
    family: str,
    num_channels: int,
    min_size: int,
    dtype: torch.dtype,
    attn_implementation: str,
    output_attentions: bool,
) -> tuple[torch.Tensor, str]:
    """The checks every backbone encoder's `forward` starts with, so that all families accept and
    refuse the same inputs with the same messages.

    Args:
        pixel_values: `[B, num_channels, H, W]`, normalised floating-point images.
        family: the backbone's name in messages ("Swin", "ViL", "CvT").
        min_size: the smallest H and W the model accepts (`EsViTConfig.min_input_size`).
        dtype: the dtype of the encoder's first weights. Floating-point input of another dtype is
            cast to it, except under autocast, which chooses the compute dtype itself.
        attn_implementation: "sdpa" or "eager".
        output_attentions: attention maps exist on the eager path only, so this forces "eager".

    Returns:
        `(pixel_values, attn_implementation)` to run the encoder with.

    Raises:
        TypeError: not a tensor, or not floating point (e.g. raw uint8 pixels).
        ValueError: another shape, an empty batch, an image smaller than `min_size`, or an unknown
            attention implementation.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4 or shape[1] != num_channels:
        raise ValueError(f"pixel_values must be [batch, {num_channels}, height, width], got shape {shape}.")
    if shape[0] == 0:
        raise ValueError(f"pixel_values is an empty batch (shape {shape}); pass at least one image.")
    if shape[2] < min_size or shape[3] < min_size:
        raise ValueError(
            f"pixel_values of {shape[2]}x{shape[3]} px are too small for this {family} model: height and width "
            f"must be at least {min_size} px (the total stride of its stages, one last-stage token)."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}, but the model takes normalised floating-point images. "
            "Prepare raw images with the image processor (AutoImageProcessor.from_pretrained(<model folder>) or "
            "esvit.image_processor_for(config)), or normalise them yourself: pixels / 255, minus the ImageNet "
            "mean, divided by its standard deviation."
        )
    if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        pixel_values = pixel_values.to(dtype)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}.")
    if output_attentions:
        attn_implementation = "eager"  # only the eager path materialises the probabilities
    return pixel_values, attn_implementation


class BackboneEncoder(nn.Module):
    """What the three backbone encoders share: the input checks, then their own `encode`.

    Subclasses set `backbone_type` (the config value they implement) and `family` (their name in
    messages), call `super().__init__(config)`, and implement `encode(pixel_values,
    output_hidden_states, output_attentions, output_block_features, attn_implementation) ->
    EncoderOutput` on checked input.
    """

    backbone_type: str = ""
    family: str = "EsViT"

    def __init__(self, config):
        super().__init__()
        if config.backbone_type != self.backbone_type:
            raise ValueError(
                f"{type(self).__name__} needs backbone_type={self.backbone_type!r}, got {config.backbone_type!r}."
            )
        self.config = config
        self.min_input_size = config.min_input_size

    def forward(
        self,
        pixel_values: torch.Tensor,  # [B, C, H, W]
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_block_features: bool = False,
        attn_implementation: str = "sdpa",
    ) -> EncoderOutput:
        pixel_values, attn_implementation = prepare_encoder_inputs(
            pixel_values,
            family=self.family,
            num_channels=self.config.num_channels,
            min_size=self.min_input_size,
            dtype=next(self.parameters()).dtype,
            attn_implementation=attn_implementation,
            output_attentions=output_attentions,
        )
        return self.encode(
            pixel_values, output_hidden_states, output_attentions, output_block_features, attn_implementation
        )

    def encode(self, pixel_values, output_hidden_states, output_attentions, output_block_features, attn_implementation):
        raise NotImplementedError


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop a whole residual branch per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation CvT-v4 uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Transformer feed-forward block: fc1 -> act -> drop -> fc2 -> drop (names match the original)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    implementation: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with an additive bias/mask, by SDPA or eagerly.

    q: `[..., Lq, d]`, k/v: `[..., Lk, d]`, bias broadcastable to `[..., Lq, Lk]`.
    Returns the output `[..., Lq, d]` and, on the eager path, the probabilities `[..., Lq, Lk]`.
    The eager path is the only one that can return attention maps; both compute the same function.
    """
    if implementation == "eager":
        attn = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        probs = attn
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v, probs
    if bias is not None:
        # A bias of q's rank (leading 1s, a view) lets SDPA pick a fused kernel; a lower-rank one
        # sends it to the math path. Same values either way.
        bias = bias.to(q.dtype).reshape((1,) * (q.ndim - bias.ndim) + tuple(bias.shape))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out, None


__all__ = ["EncoderOutput", "prepare_encoder_inputs", "DropPath", "QuickGELU", "Mlp", "attend", "drop_path"]
