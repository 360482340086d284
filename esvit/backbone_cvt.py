"""CvT-v4 backbone of EsViT: convolutional embeddings and windowed convolutional attention.

EsViT (Li et al., ICLR 2022, arXiv:2106.09785, Sec. 3.1 and App. A) builds a third multi-stage
backbone from CvT (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021),
its "v4" variant restricting attention to non-overlapping windows. Each stage is

    strided Conv2d patch embedding -> LayerNorm -> depth x [
        x + DropPath(proj_out(WindowAttention(qkv = pw(BN(dw(LN(x)))))))
        x + DropPath(MLP_QuickGELU(LN(x)))
    ]

with these details, all needed to reproduce the released checkpoints:

* q, k and v come from one depthwise convolution (kernel `cvt_qkv_kernel_size`), a BatchNorm and a
  pointwise projection to three times the width; the input is zero-padded bottom/right to a
  multiple of the window first, and the padded tokens take part in the attention unmasked.
* The window is `min(window_size, H, W)`, so a 96-px crop (stages of 24, 12, 6, 3 tokens per side)
  pads 24 -> 28 and 12 -> 14 but attends over a single 6x6 and 3x3 window in the last two stages.
* Attention logits are scaled by `stage_width ** -0.5`, not by the head width.
* LayerNorms (eps 1e-5) always compute in float32.

Tokens are kept channels-last, `[B, H, W, C]`, inside a stage. The original's 1x1 convolutions
(pointwise q/k/v, output projection, MLP) are `nn.Linear` layers here; `convert_cvt.py` reshapes
their weights. The variants with relative-position bias, shifted windows or a ResNet stem are not
implemented (the original's versions of them fail on 96-px crops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_esvit import EsViTConfig
from .layers import BackboneEncoder, DropPath, EncoderOutput, Mlp, QuickGELU, attend


class CvtLayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input dtype, then cast back (as CvT does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class CvtConv2d(nn.Conv2d):
    """Conv2d initialised like the original CvT: truncated normal weights, zero bias.

    The hook lives on the convolution itself (not on a parent) so that it also runs when
    transformers skips parameter-less parents during remote-code initialisation.
    """

    def _init_esvit_weights(self, std: float) -> None:
        init.trunc_normal_(self.weight, std=std)
        if self.bias is not None:
            init.zeros_(self.bias)


class CvtConvEmbedding(nn.Module):
    """Overlapping strided convolution + LayerNorm: `[B, C_in, H, W]` -> `[B, H', W', C]`."""

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = CvtConv2d(in_channels, dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = CvtLayerNorm(dim, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values)  # [B, C, H', W']
        return self.norm(x.permute(0, 2, 3, 1))  # [B, H', W', C]


class CvtDepthwiseProjection(nn.Module):
    """Depthwise conv -> BatchNorm -> pointwise projection: `[B, H, W, C]` -> `[B, H, W, C_out]`."""

    def __init__(self, dim: int, out_dim: int, kernel_size: int, padding: int, bias: bool):
        super().__init__()
        self.dw = CvtConv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.pw = nn.Linear(dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.dw(x.permute(0, 3, 1, 2)))  # [B, C, H, W]
        return self.pw(x.permute(0, 2, 3, 1))  # [B, H, W, C_out]


class CvtWindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping square windows of a `[B, H, W, C]` map."""

    def __init__(self, config: EsViTConfig, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = config.window_size
        # CvT-v4 scales by the full stage width, not the per-head width.
        self.scale = dim**-0.5
        self.attention_dropout = float(config.attention_probs_dropout_prob)
        self.qkv = CvtDepthwiseProjection(
            dim, 3 * dim, config.cvt_qkv_kernel_size, config.cvt_qkv_padding, bias=config.qkv_bias
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_implementation: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, height, width, dim = x.shape
        # Small maps (e.g. 6x6 and 3x3 in the last stages of a 96-px crop) form one smaller window.
        window = min(self.window_size, height, width)
        pad_b = (window - height % window) % window
        pad_r = (window - width % window) % window
        if pad_b or pad_r:
            # Zero-padding precedes the convolutional projection, and the padded positions stay
            # visible as keys: this is what the released models were trained with.
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        padded_h, padded_w = height + pad_b, width + pad_r
        rows, cols = padded_h // window, padded_w // window
        head_dim = dim // self.num_heads

        qkv = self.qkv(x)  # [B, Hp, Wp, 3C]
        qkv = qkv.view(batch, rows, window, cols, window, 3, self.num_heads, head_dim)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7)  # [3, B, rows, cols, heads, ws, ws, d]
        qkv = qkv.reshape(3, batch * rows * cols, self.num_heads, window * window, head_dim)
        q, k, v = qkv.unbind(0)  # each [B*nW, heads, ws*ws, d]

        out, probs = attend(
            q,
            k,
            v,
            scale=self.scale,
            dropout_p=self.attention_dropout if self.training else 0.0,
            implementation=attn_implementation,
        )  # out: [B*nW, heads, ws*ws, d]; probs: [B*nW, heads, ws*ws, ws*ws] | None

        out = out.view(batch, rows, cols, self.num_heads, window, window, head_dim)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, padded_h, padded_w, dim)
        if pad_b or pad_r:
            out = out[:, :height, :width, :]
        return self.proj_out(out), probs  # [B, H, W, C]


class CvtBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: windowed convolutional attention, then a QuickGELU MLP."""

    def __init__(self, config: EsViTConfig, dim: int, num_heads: int, drop_path: float):
        super().__init__()
        eps = config.layer_norm_eps
        self.norm1 = CvtLayerNorm(dim, eps=eps)
        self.attn = CvtWindowAttention(config, dim, num_heads)
        self.norm2 = CvtLayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), act_layer=QuickGELU, drop=config.hidden_dropout_prob)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, attn_implementation: str = "sdpa"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden_states: [B, H, W, C]
        attn_out, probs = self.attn(self.norm1(hidden_states), attn_implementation=attn_implementation)
        hidden_states = hidden_states + self.drop_path(attn_out)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, probs


class CvtStage(nn.Module):
    """One pyramid level: a convolutional embedding followed by `depth` blocks."""

    def __init__(self, config: EsViTConfig, index: int, in_channels: int, drop_paths: list[float]):
        super().__init__()
        dim = config.hidden_sizes[index]
        self.patch_embed = CvtConvEmbedding(
            in_channels,
            dim,
            kernel_size=config.patch_sizes[index],
            stride=config.patch_strides[index],
            padding=config.patch_padding[index],
            eps=config.layer_norm_eps,
        )
        self.blocks = nn.ModuleList(CvtBlock(config, dim, config.num_heads[index], rate) for rate in drop_paths)


class CvtEncoder(BackboneEncoder):
    """The CvT-v4 feature pyramid with EsViT's pooled, region and per-block features.

    `forward(pixel_values [B, C, H, W])` returns an `EncoderOutput` whose `last_hidden_state` holds
    the final-normed last-stage tokens `[B, H_4 * W_4, C_4]` (49 at 224 px, 9 at 96 px) and whose
    `pooler_output` is their mean.
    """

    backbone_type, family = "cvt", "CvT"

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        # `EsViTConfig.validate_cvt` has checked what CvT-v4 needs (no absolute embeddings, a normed
        # patch embedding, a size-preserving depthwise q/k/v convolution).
        total = sum(config.depths)
        # Stochastic-depth rate grows linearly over all blocks of all stages. Computed on the CPU
        # explicitly: `from_pretrained` builds the model under a meta-device context.
        rates = torch.linspace(0, config.drop_path_rate, total, device="cpu").tolist()
        stages = []
        in_channels, start = config.num_channels, 0
        for index, depth in enumerate(config.depths):
            stages.append(CvtStage(config, index, in_channels, rates[start : start + depth]))
            in_channels, start = config.hidden_sizes[index], start + depth
        self.stages = nn.ModuleList(stages)
        self.norm = CvtLayerNorm(in_channels, eps=config.layer_norm_eps)

    def encode(
        self, pixel_values, output_hidden_states, output_attentions, output_block_features, attn_implementation
    ) -> EncoderOutput:
        """The forward pass on input checked by `BackboneEncoder.forward`."""

        stage_outputs: list[torch.Tensor] = []
        spatial_shapes: list[tuple[int, int]] = []
        attentions: list[torch.Tensor] = []
        block_features: list[torch.Tensor] = []
        embedding_output = None
        last_stage = len(self.stages) - 1

        x = pixel_values
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = x.permute(0, 3, 1, 2)  # [B, C, H, W] for the strided convolution
            x = stage.patch_embed(x)  # [B, H, W, C]
            if index == 0 and output_hidden_states:
                embedding_output = x.flatten(1, 2)
            for block in stage.blocks:
                x, probs = block(x, attn_implementation=attn_implementation)
                if output_attentions:
                    attentions.append(probs)
                if output_block_features:
                    tokens = self.norm(x) if index == last_stage else x
                    block_features.append(tokens.mean(dim=(1, 2)))  # [B, C]
            if output_hidden_states:
                stage_outputs.append(x.flatten(1, 2))  # [B, H*W, C]
                spatial_shapes.append((x.shape[1], x.shape[2]))

        region = self.norm(x.flatten(1, 2))  # [B, L, C]
        return EncoderOutput(
            last_hidden_state=region,
            pooler_output=region.mean(dim=1),  # [B, C]
            stage_outputs=tuple(stage_outputs) if output_hidden_states else None,
            stage_spatial_shapes=tuple(spatial_shapes) if output_hidden_states else None,
            embedding_output=embedding_output,
            attentions=tuple(attentions) if output_attentions else None,
            block_features=tuple(block_features) if output_block_features else None,
        )


__all__ = ["CvtEncoder", "CvtLayerNorm"]
