"""Swin Transformer backbone as EsViT uses it (shifted-window attention over a 4-stage pyramid).

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (ICCV 2021,
arXiv:2103.14030), in the variant that EsViT (Li et al., ICLR 2022, arXiv:2106.09785) pretrains:

* Window geometry is fixed once, from `config.image_size`. A stage whose resolution at that size
  is not larger than the window attends over one window of exactly that resolution and never
  shifts (stage 4 of every W7 model; stages 3-4 of W14 models). A stage's resolution at that size
  is image_size // patch, halved and rounded up at every patch merging. Other inputs, e.g. the
  96-px local crops of multi-crop training, keep this geometry: their token maps are zero-padded
  at the bottom and right to a multiple of the window *before* the cyclic shift; non-shifted
  windows get no padding mask (padded tokens take part in attention), shifted windows get the
  usual region mask computed on the padded map. This is what the released checkpoints were
  trained with, and it differs from implementations that re-derive windows per input.
* Patch merging zero-pads maps of odd height or width.
* The pooled feature is the token mean of the last stage after the final LayerNorm; the region
  features are those normalised tokens.

Hub-facing: imports torch, transformers and single-dot siblings only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_esvit import EsViTConfig
from .layers import BackboneEncoder, DropPath, EncoderOutput, Mlp, attend

# Additive logit for token pairs from different regions of a shifted window: large enough that
# the softmax gives them (numerically) zero weight, the value the released models were trained with.
SHIFT_MASK_VALUE = -100.0


# ------------------------------------------------------------------------------ shape helpers
def pinned_window(resolution: int, window_size: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) of a block whose stage has `resolution` tokens per side at the training size.

    A stage that fits into one window uses a single window of its own size and no shift.
    """
    if resolution <= window_size:
        return resolution, 0
    return window_size, (window_size // 2 if shifted else 0)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, num_windows, window_size**2, C], windows in row-major order.

    H and W must be multiples of `window_size`.
    """
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, H/ws, W/ws, ws, ws, C]
    return x.reshape(batch, -1, window_size * window_size, channels)


def window_merge(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B, num_windows, window_size**2, C] -> [B, H, W, C]."""
    batch, _, _, channels = windows.shape
    x = windows.view(batch, height // window_size, width // window_size, window_size, window_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, H/ws, ws, W/ws, ws, C]
    return x.reshape(batch, height, width, channels)


def build_relative_position_index(window_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[ws*ws, ws*ws] index into a `(2*ws-1)**2`-row bias table for every (query, key) pair."""
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(window_size, device=device), torch.arange(window_size, device=device), indexing="ij"
        )
    ).flatten(1)  # [2, N]
    delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, N, N], each in [0, 2ws-2]
    return delta[0] * (2 * window_size - 1) + delta[1]  # [N, N]


def shift_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Additive mask [num_windows, ws*ws, ws*ws] for shifted windows on a (padded) H x W map.

    After the cyclic shift by `shift_size`, the last window row/column holds tokens from up to
    three regions that were not adjacent in the image (the bottom/right strip and the wrapped-in
    top/left strip). Tokens may only attend within their region. Regions are numbered along each
    axis as [0, H-ws), [H-ws, H-shift), [H-shift, H).
    """

    def regions(size: int) -> torch.Tensor:
        pos = torch.arange(size, device=device)
        return (pos >= size - window_size).long() + (pos >= size - shift_size).long()  # [size] in {0,1,2}

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]  # [H, W]
    labels = window_partition(labels[None, :, :, None], window_size)[0, :, :, 0]  # [nW, N]
    different = labels[:, None, :] != labels[:, :, None]  # [nW, N, N]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, SHIFT_MASK_VALUE)


# -------------------------------------------------------------------------------------- modules
class SwinPatchEmbed(nn.Module):
    """Non-overlapping patch projection: [B, C_in, H, W] -> [B, (H//p)*(W//p), C] (+ LayerNorm)."""

    def __init__(self, config: EsViTConfig):
        super().__init__()
        patch = config.patch_sizes[0]
        self.patch_size = patch
        self.proj = nn.Conv2d(config.num_channels, config.hidden_sizes[0], kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(config.hidden_sizes[0], eps=config.layer_norm_eps) if config.patch_norm else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(pixel_values)  # [B, C, H/p, W/p] (a trailing remainder is dropped, as a strided conv does)
        spatial = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [B, L, C]
        if self.norm is not None:
            x = self.norm(x)
        return x, spatial


class SwinWindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    def __init__(self, config: EsViTConfig, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )  # [(2ws-1)^2, heads]
        nn.init.trunc_normal_(self.relative_position_bias_table, std=config.initializer_range)
        # Derived from the window size alone, so it is rebuilt rather than stored in checkpoints.
        self.register_buffer("relative_position_index", build_relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def _init_esvit_weights(self, std: float) -> None:
        init.trunc_normal_(self.relative_position_bias_table, std=std)
        init.copy_(self.relative_position_index, build_relative_position_index(self.window_size))

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] with N = window_size**2."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # [N*N, heads]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(
        self,
        windows: torch.Tensor,  # [B, nW, N, C]
        mask: torch.Tensor | None = None,  # [nW, N, N] additive, or None
        attn_implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_windows, n, channels = windows.shape
        heads = self.num_heads
        head_dim = channels // heads
        qkv = self.qkv(windows).view(batch, num_windows, n, 3, heads, head_dim)
        bias = self.relative_position_bias()  # [heads, N, N]
        if mask is None:
            # One bias for every window: windows stay in the batch dimension.
            qkv = qkv.view(batch * num_windows, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B*nW, h, N, d]
        else:
            # The mask differs per window; folding windows into the head dimension lets one
            # [nW*h, N, N] bias broadcast over the batch without materialising it B times.
            qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, batch, num_windows * heads, n, head_dim)
            bias = (mask[:, None] + bias[None]).reshape(num_windows * heads, n, n)  # [nW*h, N, N]
        q, k, v = qkv.unbind(0)
        out, probs = attend(
            q,
            k,
            v,
            scale=self.scale,
            bias=bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
            implementation=attn_implementation,
        )
        out = out.reshape(batch, num_windows, heads, n, head_dim).transpose(2, 3)  # [B, nW, N, h, d]
        out = self.proj_drop(self.proj(out.reshape(batch, num_windows, n, channels)))  # [B, nW, N, C]
        if probs is not None:
            probs = probs.reshape(batch * num_windows, heads, n, n)
        return out, probs


class SwinBlock(GradientCheckpointingLayer):
    """LN -> (shifted) window attention -> residual -> LN -> MLP -> residual."""

    def __init__(
        self, config: EsViTConfig, dim: int, num_heads: int, window_size: int, shift_size: int, drop_path: float
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must lie in [0, window_size={window_size}), got {shift_size}.")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = SwinWindowAttention(config, dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), drop=config.hidden_dropout_prob)
        # (padded H, padded W, device, dtype) -> [nW, N, N]; filled lazily, one entry per input size.
        self.shift_mask_cache: dict[tuple, torch.Tensor] = {}

    def shift_mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Inside a compiled graph the mask is a constant of the static shapes; a cache lookup would
            # put a guard on the (growing) dict and recompile the whole backbone on the next step.
            return shift_window_mask(height, width, self.window_size, self.shift_size, device=device, dtype=dtype)
        key = (height, width, device, dtype)
        mask = self.shift_mask_cache.get(key)
        if mask is None:
            mask = shift_window_mask(height, width, self.window_size, self.shift_size, device=device, dtype=dtype)
            self.shift_mask_cache[key] = mask
        return mask

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, H*W, C]
        spatial_shape: tuple[int, int],
        attn_implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = spatial_shape
        batch, length, channels = hidden_states.shape
        if length != height * width:
            raise ValueError(f"got {length} tokens for a {height}x{width} map.")
        ws, shift = self.window_size, self.shift_size

        x = self.norm1(hidden_states).view(batch, height, width, channels)
        pad_bottom, pad_right = (-height) % ws, (-width) % ws
        if pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))  # zeros after the norm, as trained
        padded_h, padded_w = height + pad_bottom, width + pad_right

        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.shift_mask(padded_h, padded_w, x.device, x.dtype)

        windows, probs = self.attn(window_partition(x, ws), mask, attn_implementation)  # [B, nW, N, C]
        x = window_merge(windows, ws, padded_h, padded_w)  # [B, Hp, Wp, C]
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :height, :width].reshape(batch, length, channels)

        hidden_states = hidden_states + self.drop_path(x)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, probs

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C -> 2C): [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]."""

    def __init__(self, config: EsViTConfig, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=config.layer_norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, spatial_shape: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = spatial_shape
        batch, _, channels = hidden_states.shape
        x = hidden_states.view(batch, height, width, channels)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        half_h, half_w = (height + 1) // 2, (width + 1) // 2
        # Channel order of the 4C vector is (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
        x = x.view(batch, half_h, 2, half_w, 2, channels).permute(0, 1, 3, 4, 2, 5)  # [B, H/2, W/2, col, row, C]
        x = x.reshape(batch, half_h * half_w, 4 * channels)
        return self.reduction(self.norm(x)), (half_h, half_w)


class SwinStage(nn.Module):
    """Container for one stage: `blocks` followed by an optional `downsample` (patch merging)."""

    def __init__(self, blocks: list[SwinBlock], downsample: SwinPatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class SwinEncoder(BackboneEncoder):
    """The Swin backbone of EsViT. `forward(pixel_values [B, C, H, W]) -> EncoderOutput`.

    Parameter names follow the original checkpoints (`patch_embed.*`, `layers.{i}.blocks.{j}.*`,
    `layers.{i}.downsample.*`, `norm.*`, `absolute_pos_embed`), so converting a checkpoint only
    adds a prefix and drops derived buffers (see `convert_swin.py`).

    Example:
        >>> config = EsViTConfig.from_preset("swin-micro")
        >>> out = SwinEncoder(config)(torch.randn(2, 3, 96, 96))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([2, 9, 128]), torch.Size([2, 128]))
    """

    backbone_type, family = "swin", "Swin"

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        self.patch_embed = SwinPatchEmbed(config)
        # Each stage is built for the map it gets at the training size: image_size // patch, then
        # halved and rounded UP by every patch merging (it pads odd maps), e.g. 14, 7, 4 for 28 px
        # with 2x2 patches. `EsViTConfig` guarantees every stage at least one token.
        self.stage_resolutions = config.stage_resolutions()
        base_resolution = self.stage_resolutions[0]
        self.base_resolution = base_resolution
        if config.use_absolute_embeddings:
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, base_resolution * base_resolution, config.hidden_sizes[0])
            )  # [1, L0, C0]
            nn.init.trunc_normal_(self.absolute_pos_embed, std=config.initializer_range)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)

        total = config.num_blocks
        # Stochastic depth grows linearly with depth; float32 linspace on CPU (also under a meta-device context).
        rates = torch.linspace(0, config.drop_path_rate, total, device="cpu").tolist()
        stages = []
        block_id = 0
        for i, (dim, depth, heads, resolution) in enumerate(
            zip(config.hidden_sizes, config.depths, config.num_heads, self.stage_resolutions)
        ):
            blocks = []
            for j in range(depth):
                window, shift = pinned_window(resolution, config.window_size, shifted=j % 2 == 1)
                blocks.append(SwinBlock(config, dim, heads, window, shift, rates[block_id]))
                block_id += 1
            downsample = SwinPatchMerging(config, dim) if i < config.num_stages - 1 else None
            stages.append(SwinStage(blocks, downsample))
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)

    def _init_esvit_weights(self, std: float) -> None:
        if self.absolute_pos_embed is not None:
            init.trunc_normal_(self.absolute_pos_embed, std=std)

    def _position_embedding(self, spatial: tuple[int, int]) -> torch.Tensor:
        """[1, H*W, C0]; resized bicubically when the input is not at the training size."""
        side = self.base_resolution
        if spatial == (side, side):
            return self.absolute_pos_embed
        grid = self.absolute_pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C0, s, s]
        grid = F.interpolate(grid, size=spatial, mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def encode(
        self, pixel_values, output_hidden_states, output_attentions, output_block_features, attn_implementation
    ) -> EncoderOutput:
        """The forward pass on input checked by `BackboneEncoder.forward`."""
        x, spatial = self.patch_embed(pixel_values)  # [B, L0, C0]
        if self.absolute_pos_embed is not None:
            x = x + self._position_embedding(spatial)
        x = self.pos_drop(x)
        embedding_output = x

        stage_outputs, stage_shapes, attentions, block_tokens = [], [], [], []
        for stage in self.layers:
            for block in stage.blocks:
                x, probs = block(x, spatial, attn_implementation=attn_implementation)
                if output_attentions:
                    attentions.append(probs)
                if output_block_features:
                    block_tokens.append(x)
            stage_outputs.append(x)
            stage_shapes.append(spatial)
            if stage.downsample is not None:
                x, spatial = stage.downsample(x, spatial)

        region = self.norm(x)  # [B, L, C]
        block_features = None
        if output_block_features:
            last_stage_start = len(block_tokens) - self.config.depths[-1]
            block_features = tuple(
                (self.norm(t) if i >= last_stage_start else t).mean(dim=1) for i, t in enumerate(block_tokens)
            )  # each [B, C_i]
        return EncoderOutput(
            last_hidden_state=region,
            pooler_output=region.mean(dim=1),  # [B, C]
            stage_outputs=tuple(stage_outputs) if output_hidden_states else None,
            stage_spatial_shapes=tuple(stage_shapes) if output_hidden_states else None,
            embedding_output=embedding_output if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            block_features=block_features,
        )


__all__ = [
    "SwinEncoder",
    "build_relative_position_index",
    "pinned_window",
    "shift_window_mask",
    "window_merge",
    "window_partition",
]
