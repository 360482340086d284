"""Vision Longformer (ViL) backbone, as used by EsViT.

Zhang et al., "Multi-Scale Vision Longformer" (ICCV 2021, arXiv:2103.15358); EsViT (Li et al.,
ICLR 2022, arXiv:2106.09785) pretrains it with view- and region-level self-distillation. The
network is a pyramid of stages. Each stage embeds the previous stage's feature map with a strided
convolution, prepends `g` learned global tokens, and runs `depth` pre-norm transformer blocks.
The attention of a stage is either

* "longformer" (2-D sliding-chunk attention, §3.2 of the ViL paper): the feature map is cut into
  `w x w` chunks; every local query attends, in one softmax, to the global tokens and to the keys of
  its own chunk and of the 8 neighbouring chunks (keys outside the image or in the zero padding
  are masked). Global queries attend to every token. Relative position biases: a table over the
  `(4w-1)^2` chunk-neighbourhood offsets plus learned global<->local and global<->global biases.
  With `vil_mode > 0`, training uses the own chunk plus ONE random neighbour chunk per layer
  (evaluation always uses all 9);
* "full": plain multi-head attention over all tokens, with a relative position bias table sized
  for the configured `image_size`. For another number of tokens the `[L0, L0]` bias matrix is
  resampled bicubically, treated as an image, by the factor `L / L0` (what the released models
  saw for their 96-px crops).

The released EsViT ViL shares the global-query projections with the local ones (`SHARE_W`), so
there is one set of q/kv/output weights per sparse attention; the original checkpoints list them
twice (`*_global` aliases), which `convert_vil.py` checks and drops.

Random neighbour sampling is reproducible: the draw for all sparse layers of one forward comes from
`VilEncoder.generator` (a `torch.Generator`, set it with `VilEncoder.manual_seed(seed)`), or from
torch's default CPU generator when that attribute is `None` (then `torch.manual_seed` governs it).
The draw is made once per forward and passed to the blocks, so gradient checkpointing recomputes
a block with the same neighbours.

Hub-facing: imports only torch, transformers and single-dot siblings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_esvit import EsViTConfig
from .layers import BackboneEncoder, DropPath, EncoderOutput, Mlp, attend

#: Neighbour chunks in the order of the 3x3 neighbourhood, row-major over the offsets (-1, 0, 1);
#: index 4 is the query's own chunk.
SELF_CHUNK = 4
OTHER_CHUNKS = (0, 1, 2, 3, 5, 6, 7, 8)


# ------------------------------------------------------------------------------ index helpers
def sparse_relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Index into the `(4w-1)^2` bias table for a query of the centre chunk and every key of the
    3x3 chunk neighbourhood.

    Returns `[w*w, 9*w*w]` (int64): query position `a*w+b` in its chunk; key `n*w*w + c*w+d` for
    neighbour chunk `n` (row-major over offsets -1, 0, 1) at position `(c, d)` inside it.
    """
    pos = torch.arange(window, device=device)
    offsets = torch.arange(-1, 2, device=device) * window
    # key coordinates relative to the centre chunk's origin: [3, w] per axis
    key = (offsets[:, None] + pos[None, :]).reshape(-1)  # [3w]
    rel = pos[:, None] - key[None, :] + 2 * window - 1  # [w, 3w] in [0, 4w-2]
    span = 4 * window - 1
    # [qa, qb, ni, c, nj, d] -> [qa, qb, ni, nj, c, d]
    index = rel[:, None, :, None] * span + rel[None, :, None, :]  # [w, w, 3w, 3w]
    index = index.reshape(window, window, 3, window, 3, window).permute(0, 1, 2, 4, 3, 5)
    return index.reshape(window * window, 9 * window * window).contiguous()


def full_relative_position_index(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Swin-style pairwise index into a `(2h-1)*(2w-1)` table for an `h x w` grid: `[h*w, h*w]`."""
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # [2, L]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, L, L]
    return (rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)


def chunk_validity(height: int, width: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Which keys of each chunk's 3x3 neighbourhood lie inside the `height x width` map.

    Keys in a neighbour chunk outside the chunk grid, or in the zero padding that rounds the map up
    to a multiple of `window`, are invalid (the original's zero-padding variant, `sw_exact=0`).
    Returns `[num_chunks, 9, w*w]` bool, chunks row-major.
    """
    offsets = torch.arange(-1, 2, device=device)
    pos = torch.arange(window, device=device)

    def axis(size: int) -> torch.Tensor:  # [num_chunks_axis, 3, w]
        chunks = torch.arange(math.ceil(size / window), device=device)
        coord = (chunks[:, None, None] + offsets[None, :, None]) * window + pos[None, None, :]
        return (coord >= 0) & (coord < size)

    rows, cols = axis(height), axis(width)
    valid = rows[:, None, :, None, :, None] & cols[None, :, None, :, None, :]  # [mx, my, 3, 3, w, w]
    return valid.reshape(rows.shape[0] * cols.shape[0], 9, window * window)


def image_to_chunks(x: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """`[..., height*width, d]` tokens -> `[..., mx, my, w*w, d]` chunks (zero padded bottom/right)."""
    *lead, _, d = x.shape
    x = x.reshape(*lead, height, width, d)
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    mx, my = (height + pad_h) // window, (width + pad_w) // window
    x = x.reshape(*lead, mx, window, my, window, d).transpose(-4, -3)  # [..., mx, my, w, w, d]
    return x.reshape(*lead, mx, my, window * window, d)


def chunks_to_image(x: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """Inverse of `image_to_chunks`: `[..., mx, my, w*w, d]` -> `[..., height*width, d]` (padding cut)."""
    *lead, mx, my, _, d = x.shape
    x = x.reshape(*lead, mx, my, window, window, d).transpose(-4, -3)  # [..., mx, w, my, w, d]
    x = x.reshape(*lead, mx * window, my * window, d)[..., :height, :width, :]
    return x.reshape(*lead, height * width, d)


def gather_neighbour_chunks(chunks: torch.Tensor, neighbours: torch.Tensor | None) -> torch.Tensor:
    """For every chunk, the chunks of its 3x3 neighbourhood (zeros beyond the grid), concatenated.

    chunks: `[..., mx, my, w*w, d]`; neighbours: indices into the 9 (row-major) or None for all.
    Returns `[..., mx*my, K*w*w, d]` with K = len(neighbours) (9 when None), neighbour-major.
    """
    *lead, mx, my, w2, d = chunks.shape
    padded = F.pad(chunks, (0, 0, 0, 0, 1, 1, 1, 1))  # [..., mx+2, my+2, w2, d]
    windows = padded.unfold(-4, 3, 1).unfold(-4, 3, 1)  # [..., mx, my, w2, d, 3, 3]
    windows = windows.flatten(-2) if neighbours is None else windows[..., neighbours // 3, neighbours % 3]
    windows = windows.movedim(-1, -3)  # [..., mx, my, K, w2, d]
    return windows.reshape(*lead, mx * my, -1, d)


# ----------------------------------------------------------------------------------- modules
class VilEmbeddings(nn.Module):
    """Strided-convolution patch embedding of one stage, optional LayerNorm, global tokens and
    (for `use_absolute_embeddings`) factorised absolute position embeddings.

    Input `[B, C_in, H, W]`; output `[B, g + h*w, C]` (global tokens first) and `(h, w)`.
    """

    def __init__(
        self,
        config: EsViTConfig,
        in_channels: int,
        dim: int,
        patch_size: int,
        num_global_tokens: int,
        grid_size: int,
    ):
        super().__init__()
        self.num_global_tokens = num_global_tokens
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.patch_norm else None
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim)) if num_global_tokens else None
        self.use_absolute_embeddings = config.use_absolute_embeddings
        if self.use_absolute_embeddings:
            if dim % 2:
                raise ValueError(f"absolute position embeddings split the width in two; {dim} is odd.")
            self.grid_size = grid_size
            self.global_position_embeddings = nn.Parameter(torch.zeros(1, num_global_tokens, dim))
            self.row_position_embeddings = nn.Parameter(torch.zeros(1, grid_size, dim // 2))
            self.column_position_embeddings = nn.Parameter(torch.zeros(1, grid_size, dim // 2))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _init_esvit_weights(self, std: float) -> None:
        for param in (self.global_tokens, *self._absolute_parameters()):
            if param is not None:
                init.trunc_normal_(param, std=std)

    def _absolute_parameters(self) -> tuple[nn.Parameter, ...]:
        if not self.use_absolute_embeddings:
            return ()
        return (self.global_position_embeddings, self.row_position_embeddings, self.column_position_embeddings)

    def absolute_position_embeddings(self, num_tokens: int, spatial: tuple[int, int]) -> torch.Tensor:
        """`[1, num_tokens, C]`: global-token embeddings followed by the grid embeddings.

        The grid embeddings are resampled whenever `num_tokens` (global tokens INCLUDED) differs
        from the configured grid's size, by the factor sqrt(num_tokens / grid^2). That is how the
        original computes it (so even the training resolution is resampled, slightly, when the stage
        has a global token); models trained with absolute embeddings depend on it.
        """
        n = self.grid_size
        dim = self.row_position_embeddings.shape[-1] * 2
        grid = torch.cat(
            [
                self.row_position_embeddings[:, :, None, :].expand(-1, -1, n, -1),
                self.column_position_embeddings[:, None, :, :].expand(-1, n, -1, -1),
            ],
            dim=-1,
        )  # [1, n, n, C]
        if num_tokens != n * n:
            grid = F.interpolate(
                grid.permute(0, 3, 1, 2), scale_factor=math.sqrt(num_tokens / (n * n)), mode="bicubic"
            ).permute(0, 2, 3, 1)
        if tuple(grid.shape[1:3]) != tuple(spatial):
            raise ValueError(
                f"absolute position embeddings resample the {n}x{n} grid to {tuple(grid.shape[1:3])}, which "
                f"does not match the {spatial[0]}x{spatial[1]} feature map; use square inputs of a size the "
                "original model supports, or relative position biases."
            )
        return torch.cat([self.global_position_embeddings, grid.reshape(1, -1, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)  # [B, C, h, w]
        spatial = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self.norm is not None:
            x = self.norm(x)
        if self.global_tokens is not None:
            x = torch.cat([self.global_tokens.expand(x.shape[0], -1, -1), x], dim=1)  # [B, g+h*w, C]
        if self.use_absolute_embeddings:
            x = x + self.absolute_position_embeddings(x.shape[1], spatial)
        return self.dropout(x), spatial


class VilSparseAttention(nn.Module):
    """2-D sliding-chunk ("longformer") attention with global tokens, one joint softmax per query.

    Shares the projections between global and local queries (the released `SHARE_W` setting).
    `forward(x [B, g+h*w, C], (h, w), neighbours)` -> `[B, g+h*w, C]` and, on the eager path, the
    local queries' probabilities `[B, heads, num_chunks, w*w, g + K*w*w]` (K = 9, or 2 in random
    mode; keys ordered: global tokens, then neighbour chunks).
    """

    def __init__(self, config: EsViTConfig, dim: int, num_heads: int, num_global_tokens: int, relative: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_global_tokens = num_global_tokens
        self.window = config.window_size
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.relative = relative
        if relative:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((4 * self.window - 1) ** 2, num_heads))
            if num_global_tokens:
                # [0]: global query -> local key, [1]: local query -> global key
                self.global_local_bias = nn.Parameter(torch.zeros(2, num_heads, num_global_tokens))
                self.global_global_bias = nn.Parameter(torch.zeros(num_heads, num_global_tokens, num_global_tokens))
            # derived from the window alone: rebuilt, never stored in checkpoints
            self.register_buffer(
                "relative_position_index", sparse_relative_position_index(self.window), persistent=False
            )  # [w2, 9*w2]
        # (h, w, device, dtype) -> additive mask [num_chunks, 9, w*w]; depends on input size only
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _set_relative_position_index(self) -> None:
        buffer = self.relative_position_index
        if buffer.device.type != "meta":
            init.copy_(buffer, sparse_relative_position_index(self.window, buffer.device))

    def _init_esvit_weights(self, std: float) -> None:
        self._mask_cache.clear()
        if not self.relative:
            return
        init.trunc_normal_(self.relative_position_bias_table, std=std)
        if self.num_global_tokens:
            init.trunc_normal_(self.global_local_bias, std=std)
            init.trunc_normal_(self.global_global_bias, std=std)
        self._set_relative_position_index()

    def padding_mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[num_chunks, 9, w*w]`: 0 for valid keys, -inf for keys off the map."""
        key = (height, width, device, dtype)
        if key not in self._mask_cache:
            valid = chunk_validity(height, width, self.window, device)
            mask = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill_(~valid, float("-inf"))
            self._mask_cache[key] = mask
        return self._mask_cache[key]

    def local_bias(
        self, spatial: tuple[int, int], neighbours: torch.Tensor | None, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Bias of the local queries `[heads * num_chunks, w*w, g + K*w*w]`: relative position bias
        plus the padding mask over the neighbour chunks, the local->global bias on the global keys."""
        w2, heads, g = self.window**2, self.num_heads, self.num_global_tokens
        mask = self.padding_mask(*spatial, device, dtype)  # [nc, 9, w2]
        num_chunks = mask.shape[0]
        if neighbours is not None:
            mask = mask[:, neighbours]
        local = mask[None, :, None]  # [1, nc, 1, K, w2]
        if self.relative:
            index = self.relative_position_index.view(w2, 9, w2)
            if neighbours is not None:
                index = index[:, neighbours]
            table = self.relative_position_bias_table.to(dtype)[index]  # [w2, K, w2, heads]
            local = local + table.permute(3, 0, 1, 2)[:, None]  # [heads, nc, w2, K, w2]
        local = local.expand(heads, num_chunks, w2, -1, -1).flatten(-2)  # [heads, nc, w2, K*w2]
        if g:
            if self.relative:
                to_global = self.global_local_bias[1].to(dtype)[:, None, None, :]  # [heads, 1, 1, g]
            else:
                to_global = local.new_zeros(1, 1, 1, g)
            local = torch.cat([to_global.expand(heads, num_chunks, w2, g), local], dim=-1)
        return local.reshape(heads * num_chunks, w2, -1)

    def global_bias(self, num_local: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias of the global queries `[heads, g, g + num_local]` (None without relative bias)."""
        if not self.relative:
            return None
        to_local = self.global_local_bias[0][:, :, None].expand(-1, -1, num_local)  # [heads, g, L]
        return torch.cat([self.global_global_bias, to_local], dim=-1).to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        spatial: tuple[int, int],
        neighbours: torch.Tensor | None = None,
        attn_implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_tokens, dim = x.shape
        height, width = spatial
        g, heads, d, window = self.num_global_tokens, self.num_heads, self.head_dim, self.window
        if num_tokens != g + height * width:
            raise ValueError(f"expected {g} + {height}x{width} tokens, got {num_tokens}.")
        dropout_p = self.attention_dropout if self.training else 0.0
        if neighbours is not None:
            neighbours = neighbours.to(x.device)
        q = self.query(x).reshape(batch, num_tokens, heads, d).transpose(1, 2)  # [B, heads, N, d]
        kv = self.key_value(x).reshape(batch, num_tokens, 2, heads, d).permute(2, 0, 3, 1, 4)  # [2, B, heads, N, d]

        # local queries: own chunk + neighbour chunks + global tokens, one softmax
        q_chunks = image_to_chunks(q[:, :, g:], height, width, window)  # [B, heads, mx, my, w2, d]
        mx, my = q_chunks.shape[2:4]
        kv_local = gather_neighbour_chunks(
            image_to_chunks(kv[:, :, :, g:], height, width, window), neighbours
        )  # [2, B, heads, nc, K*w2, d]
        if g:
            kv_global = kv[:, :, :, None, :g].expand(-1, -1, -1, mx * my, -1, -1)  # [2, B, heads, nc, g, d]
            kv_local = torch.cat([kv_global, kv_local], dim=-2)  # [2, B, heads, nc, g+K*w2, d]
        bias = self.local_bias(spatial, neighbours, q.dtype, q.device)  # [heads*nc, w2, g+K*w2]
        local_out, probs = attend(
            q_chunks.reshape(batch, heads * mx * my, window * window, d),
            kv_local[0].reshape(batch, heads * mx * my, -1, d),
            kv_local[1].reshape(batch, heads * mx * my, -1, d),
            scale=self.scale,
            bias=bias[None],
            dropout_p=dropout_p,
            implementation=attn_implementation,
        )  # [B, heads*nc, w2, d]
        local_out = chunks_to_image(local_out.reshape(batch, heads, mx, my, -1, d), height, width, window)
        if probs is not None:
            probs = probs.reshape(batch, heads, mx * my, window * window, -1)

        if g:
            # global queries attend to every token (global and local), plain attention
            global_out, _ = attend(
                q[:, :, :g],
                kv[0],
                kv[1],
                scale=self.scale,
                bias=self.global_bias(height * width, q.dtype),
                dropout_p=dropout_p,
                implementation=attn_implementation,
            )  # [B, heads, g, d]
            local_out = torch.cat([global_out, local_out], dim=2)  # [B, heads, N, d]
        out = local_out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_dropout(self.proj(out)), probs


class VilFullAttention(nn.Module):
    """Multi-head attention over all tokens with a relative position bias sized for the configured
    image (`grid_size x grid_size` tokens) plus global<->local and global<->global biases.

    `forward(x [B, g+L, C], (h, w))` -> `[B, g+L, C]` and, on the eager path, `[B, heads, N, N]`.
    """

    def __init__(
        self, config: EsViTConfig, dim: int, num_heads: int, num_global_tokens: int, relative: bool, grid_size: int
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_global_tokens = num_global_tokens
        self.grid_size = grid_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.relative = relative
        if relative:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2, num_heads))
            if num_global_tokens:
                self.global_local_bias = nn.Parameter(torch.zeros(2, num_heads, num_global_tokens))
                self.global_global_bias = nn.Parameter(torch.zeros(num_heads, num_global_tokens, num_global_tokens))
            self.register_buffer(
                "relative_position_index", full_relative_position_index(grid_size, grid_size), persistent=False
            )  # [L0, L0]

    def _set_relative_position_index(self) -> None:
        buffer = self.relative_position_index
        if buffer.device.type != "meta":
            init.copy_(buffer, full_relative_position_index(self.grid_size, self.grid_size, buffer.device))

    def _init_esvit_weights(self, std: float) -> None:
        if not self.relative:
            return
        init.trunc_normal_(self.relative_position_bias_table, std=std)
        if self.num_global_tokens:
            init.trunc_normal_(self.global_local_bias, std=std)
            init.trunc_normal_(self.global_global_bias, std=std)
        self._set_relative_position_index()

    def relative_bias(self, num_local: int) -> torch.Tensor:
        """`[heads, N, N]` with N = g + num_local; the local block resampled if num_local differs
        from the configured grid (bicubic on the `[L0, L0]` matrix, scale factor num_local / L0)."""
        size = self.grid_size**2
        local = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        local = local.view(size, size, -1).permute(2, 0, 1)  # [heads, L0, L0]
        if num_local != size:
            local = F.interpolate(local[None], scale_factor=num_local / size, mode="bicubic")[0]
            if local.shape[-1] != num_local:
                raise ValueError(
                    f"cannot resample the {size}-token relative position bias to {num_local} tokens "
                    f"(bicubic resampling gives {local.shape[-1]}); choose another input size."
                )
        g = self.num_global_tokens
        if not g:
            return local
        heads = self.num_heads
        global_rows = torch.cat(
            [self.global_global_bias, self.global_local_bias[0][:, :, None].expand(-1, -1, num_local)], dim=-1
        )  # [heads, g, N]
        local_rows = torch.cat(
            [self.global_local_bias[1][:, None, :].expand(-1, num_local, -1), local], dim=-1
        )  # [heads, L, N]
        return torch.cat([global_rows, local_rows], dim=1).reshape(heads, g + num_local, g + num_local)

    def forward(
        self,
        x: torch.Tensor,
        spatial: tuple[int, int],
        neighbours: torch.Tensor | None = None,
        attn_implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_tokens, dim = x.shape
        num_local = spatial[0] * spatial[1]
        if num_tokens != self.num_global_tokens + num_local:
            raise ValueError(f"expected {self.num_global_tokens} + {num_local} tokens, got {num_tokens}.")
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias(num_local).to(x.dtype)[None] if self.relative else None
        out, probs = attend(
            qkv[0],
            qkv[1],
            qkv[2],
            scale=self.scale,
            bias=bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
            implementation=attn_implementation,
        )  # [B, heads, N, d]
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_dropout(self.proj(out)), probs


class VilBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        config: EsViTConfig,
        dim: int,
        num_heads: int,
        num_global_tokens: int,
        sparse: bool,
        grid_size: int,
        drop_path: float,
    ):
        super().__init__()
        relative = not config.use_absolute_embeddings
        self.sparse = sparse
        self.attention_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if sparse:
            self.attention = VilSparseAttention(config, dim, num_heads, num_global_tokens, relative)
        else:
            self.attention = VilFullAttention(config, dim, num_heads, num_global_tokens, relative, grid_size)
        self.drop_path = DropPath(drop_path)
        self.mlp_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), drop=config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        spatial: tuple[int, int],
        neighbours: torch.Tensor | None = None,
        attn_implementation: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, probs = self.attention(self.attention_norm(hidden_states), spatial, neighbours, attn_implementation)
        hidden_states = hidden_states + self.drop_path(out)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, probs


class VilStage(nn.Module):
    def __init__(self, embeddings: VilEmbeddings, blocks: list[VilBlock]):
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(blocks)


class VilEncoder(BackboneEncoder):
    """The ViL pyramid: `pixel_values [B, C, H, W]` -> `EncoderOutput`.

    pooled = the last stage's first global token after the final norm when that stage has global
    tokens, else the mean of the normed tokens; region = the normed last-stage tokens without the
    global tokens. Block features (linear probe) follow the original: a stage with global tokens
    contributes its first global token, other stages the token mean; only last-stage blocks pass
    through the final norm.

    Attributes:
        vil_mode: copied from the config; set it to 0 to stop random neighbour sampling (e.g. late
            in training, as the ViL recipe does).
        generator: `torch.Generator` (CPU) for the random neighbour choice, or None to use torch's
            default generator. `manual_seed(seed)` installs a fresh seeded one.
    """

    backbone_type, family = "vil", "ViL"

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        self.vil_mode = config.vil_mode
        self.generator: torch.Generator | None = None
        self.num_global_tokens = tuple(config.vil_num_global_tokens)
        rates = torch.linspace(0, config.drop_path_rate, config.num_blocks, device="cpu").tolist()  # stochastic depth
        stages, in_channels, start = [], config.num_channels, 0
        # side of each stage's map at the training size (strided convolutions drop a remainder)
        grids = config.stage_resolutions()
        for i, (dim, depth, heads, patch, grid) in enumerate(
            zip(config.hidden_sizes, config.depths, config.num_heads, config.patch_sizes, grids)
        ):
            g = config.vil_num_global_tokens[i]
            sparse = config.vil_attention_types[i] == "longformer"
            embeddings = VilEmbeddings(config, in_channels, dim, patch, g, grid)
            blocks = [VilBlock(config, dim, heads, g, sparse, grid, rates[start + j]) for j in range(depth)]
            stages.append(VilStage(embeddings, blocks))
            in_channels, start = dim, start + depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(config.last_hidden_size, eps=config.layer_norm_eps)
        self.num_sparse_blocks = sum(d for d, t in zip(config.depths, config.vil_attention_types) if t == "longformer")

    def manual_seed(self, seed: int) -> VilEncoder:
        """Make the random neighbour choice reproducible: a fresh CPU generator seeded with `seed`."""
        self.generator = torch.Generator().manual_seed(seed)
        return self

    def draw_neighbours(self) -> list[torch.Tensor | None]:
        """Per sparse block, the neighbour chunks its local queries see in this forward: all 9
        (None) in eval mode or with vil_mode 0; the own chunk plus one random other chunk when
        training with vil_mode > 0 (one draw per block, from `self.generator`)."""
        if not (self.training and self.vil_mode > 0):
            return [None] * self.num_sparse_blocks
        draws = torch.randint(0, len(OTHER_CHUNKS), (self.num_sparse_blocks,), generator=self.generator)
        return [torch.tensor([SELF_CHUNK, OTHER_CHUNKS[i]]) for i in draws.tolist()]

    def encode(
        self, pixel_values, output_hidden_states, output_attentions, output_block_features, attn_implementation
    ) -> EncoderOutput:
        """The forward pass on input checked by `BackboneEncoder.forward`."""
        neighbours = iter(self.draw_neighbours())
        x = pixel_values
        stage_outputs, shapes, attentions, block_features = [], [], [], []
        embedding_output = None
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            g = self.num_global_tokens[i]
            hidden, spatial = stage.embeddings(x)  # [B, g+h*w, C]; h, w >= 1 (checked above)
            if i == 0:
                embedding_output = hidden[:, g:]
            for block in stage.blocks:
                hidden, probs = block(
                    hidden,
                    spatial=spatial,
                    neighbours=next(neighbours) if block.sparse else None,
                    attn_implementation=attn_implementation,
                )
                if output_attentions:
                    attentions.append(probs)
                if output_block_features:
                    feature = self.norm(hidden) if i == last else hidden
                    block_features.append(feature[:, 0] if g else feature.mean(dim=1))  # [B, C_i]
            local = hidden[:, g:]  # [B, h*w, C]
            stage_outputs.append(local)
            shapes.append(spatial)
            x = local.transpose(1, 2).reshape(local.shape[0], -1, *spatial)  # [B, C, h, w]

        normed = self.norm(hidden)  # [B, g+h*w, C]
        g = self.num_global_tokens[-1]
        region = normed[:, g:]
        pooled = normed[:, 0] if g else normed.mean(dim=1)
        return EncoderOutput(
            last_hidden_state=region,
            pooler_output=pooled,
            stage_outputs=tuple(stage_outputs) if output_hidden_states else None,
            stage_spatial_shapes=tuple(shapes) if output_hidden_states else None,
            embedding_output=embedding_output if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            block_features=tuple(block_features) if output_block_features else None,
        )


__all__ = [
    "VilEncoder",
    "VilBlock",
    "VilEmbeddings",
    "VilSparseAttention",
    "VilFullAttention",
    "sparse_relative_position_index",
    "full_relative_position_index",
    "chunk_validity",
]
