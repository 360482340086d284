"""Pictures of what an EsViT model learned, as PNG files or as image arrays for TensorBoard.

EsViT (Li et al., ICLR 2022, arXiv:2106.09785) trains on multi-crop views with a view-level and a
region-level task. Four figures per image make those pieces visible:

* ``crops``: the 2 global and N local crops the pretraining augmentation cuts from the image
  (`esvit.training.multicrop.MultiCropAugmentation`), un-normalised, at their relative sizes;
* ``attention``: the attention of the last block of the last stage (eager path,
  `output_attentions=True`): for every last-stage token, the attention it receives, averaged over
  heads and queries, upsampled over the image as a heat map. Drawn for the window-attention
  families (Swin, CvT), whose maps are `[B * num_windows, heads, ws*ws, ws*ws]` (within a window
  only, so each window's tokens share one unit of attention), and for ViL when its last stage uses
  full attention (`[B, heads, g + L, g + L]`, global tokens first); a ViL model with a
  Longformer last stage gets no attention figure, with a message saying why;
* ``correspondence``: the region matching of EsViT's region-level task between the two global
  crops: every region token of view 1 is joined by a line to the region of view 2 whose backbone
  feature (`last_hidden_state` [B, L, C]) has the highest cosine similarity (the paper's figure);
* ``pca``: the first 3 principal components of the region features of the image, as RGB.

Everything is drawn with PIL and numpy (no plotting library). From the command line:

    python -m esvit.evaluation.visualize --model_name_or_path esvit-output/model \\
        --images cat.jpg dog.png --output_dir vis/
    python -m esvit.evaluation.visualize --model_name_or_path esvit-output/model \\
        --dataset esvit/data/fashion_mnist_500.parquet --num_images 3 --recipe tiny-cpu-default \\
        --image_size 128 --output_dir vis/ --summary vis/summary.png

writes `vis/<image>_<figure>.png` for every image and figure (and, with `--summary`, one picture
with a row per image). `--image_size` lets the model look at the whole image and at the two global
crops at a larger size than it was trained at, for more region tokens (Swin's windows stay pinned
at the training size). In Python, `render_figures` returns the same figures as `uint8 [H, W, 3]`
arrays keyed by TensorBoard tags
(`writer.add_image(tag, array, step, dataformats="HWC")`); `esvit.training.pictures` logs them
during pretraining.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..images import IMAGENET_MEAN, IMAGENET_STD, decode_image

logger = logging.getLogger(__name__)

__all__ = [
    "FIGURE_KINDS",
    "ImagePanels",
    "RegionAnalysis",
    "analyse_regions",
    "attention_note",
    "attention_panels",
    "colormap",
    "crop_panels",
    "default_augmentation",
    "draw_image",
    "figures_of",
    "main",
    "match_regions",
    "matching_panel",
    "pca_colors",
    "pca_panels",
    "received_attention",
    "render_figures",
    "summary_figure",
    "unnormalize",
    "visualize_image",
]

#: The figures, in the order they are drawn.
FIGURE_KINDS = ("crops", "attention", "correspondence", "pca")
#: Families whose attention is window attention of square windows (ViL: see `attention_note`).
WINDOW_ATTENTION_FAMILIES = ("swin", "cvt")
#: Default display side (pixels) of a global view; local crops are drawn at their relative size.
DEFAULT_PANEL_SIZE = 192

_BACKGROUND = (255, 255, 255)
_TEXT = (30, 30, 30)
_GAP = 8
# A qualitative palette for matched-region lines (Tableau 10).
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
# Anchors of matplotlib's "inferno" colour map (perceptually uniform, dark -> bright).
_INFERNO = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip


# ------------------------------------------------------------------------------------ pixels
def unnormalize(
    pixel_values: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """A normalised `[3, H, W]` tensor back to a `uint8 [H, W, 3]` image."""
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> `uint8 [..., 3]` colours of the "inferno" map."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(v).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (v - low)[..., None]
    return np.round(_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).astype(np.uint8)


def _normalise01(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _upsample_grid(grid_values: np.ndarray, stride: int, image_hw: tuple[int, int], out_hw: tuple[int, int], smooth):
    """`[h, w]` or `[h, w, 3]` token values -> `[out_h, out_w(, 3)]` over the image.

    Token (r, c) covers input pixels [r*stride, (r+1)*stride) (padding may push the last row of
    tokens past the image; that part is cut off). `smooth` picks bilinear over nearest.
    """
    height, width = image_hw
    h, w = grid_values.shape[:2]
    channels = [grid_values] if grid_values.ndim == 2 else [grid_values[..., i] for i in range(grid_values.shape[2])]
    cover_h, cover_w = h * stride, w * stride
    resample = Image.BILINEAR if smooth else Image.NEAREST
    planes = []
    for plane in channels:
        image = Image.fromarray(plane.astype(np.float32), mode="F")
        if cover_h >= height and cover_w >= width:
            image = image.resize((cover_w, cover_h), resample).crop((0, 0, width, height))
        else:  # e.g. ViL drops a remainder: stretch the map over the whole image
            image = image.resize((width, height), resample)
        planes.append(np.asarray(image.resize((out_hw[1], out_hw[0]), resample)))
    return planes[0] if grid_values.ndim == 2 else np.stack(planes, axis=-1)


def _resize(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """uint8 HWC -> PIL at (width, height); nearest when enlarging by an integer factor (sharp
    pixels of small images), bicubic otherwise."""
    image = Image.fromarray(array)
    if image.size == size:
        return image
    integer = size[0] % image.width == 0 and size[1] % image.height == 0 and size[0] >= image.width
    return image.resize(size, Image.NEAREST if integer else Image.BICUBIC)


def _blend(base: Image.Image, overlay: np.ndarray, alpha: float = 0.55) -> Image.Image:
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.round((1 - alpha) * grey + alpha * overlay).astype(np.uint8))


# ---------------------------------------------------------------------------------- layout
def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _titled(panel: Image.Image, title: str, font_size: int = 13) -> Image.Image:
    """The panel with a caption line above it."""
    font = _font(font_size)
    strip = font_size + 8
    left, top, right, bottom = ImageDraw.Draw(panel).textbbox((0, 0), title, font=font)
    width = max(panel.width, right - left + 4)
    out = Image.new("RGB", (width, panel.height + strip), _BACKGROUND)
    ImageDraw.Draw(out).text(((width - (right - left)) // 2, 3), title, fill=_TEXT, font=font)
    out.paste(panel, ((width - panel.width) // 2, strip))
    return out


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a single long word stays whole)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        left, _, right, _ = measure.textbbox((0, 0), candidate, font=font)
        if lines and right - left <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def _hstack(panels: Sequence[Image.Image], gap: int = _GAP) -> Image.Image:
    """Side by side, bottom-aligned, on white."""
    height = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), height), _BACKGROUND)
    x = 0
    for panel in panels:
        out.paste(panel, (x, height - panel.height))
        x += panel.width + gap
    return out


def _vstack(panels: Sequence[Image.Image], gap: int = _GAP) -> Image.Image:
    """One below the other, left-aligned, on white."""
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height for p in panels) + gap * (len(panels) - 1)), _BACKGROUND)
    y = 0
    for panel in panels:
        out.paste(panel, (0, y))
        y += panel.height + gap
    return out


def _framed(figure: Image.Image, title: str, margin: int = 6) -> Image.Image:
    """A figure with a bold-ish header line and a margin, as written to disk."""
    body = _titled(figure, title, font_size=15)
    out = Image.new("RGB", (body.width + 2 * margin, body.height + 2 * margin), _BACKGROUND)
    out.paste(body, (margin, margin))
    return out


# --------------------------------------------------------------------------------- analysis
@dataclass
class RegionAnalysis:
    """What the model computes for one view.

    Attributes:
        features: `[L, C]` region features (`last_hidden_state` of the view).
        grid: `(h, w)` of the last-stage token map, `h * w == L`.
        stride: input pixels per last-stage token along each side.
        image_hw: `(H, W)` of the view fed to the model.
        attention: `[h, w]` attention received by each last-stage token (mean over heads and
            queries of the last block), or None where it is not drawn (see `attention_note`).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    stride: int
    image_hw: tuple[int, int]
    attention: np.ndarray | None = None


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The `EsViTModel` inside an `EsViTForPreTraining` (or a DDP / compiled wrapper of one)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "esvit", model)


def _token_stride(config) -> int:
    return math.prod(stride for _, stride, _ in config.stage_downsampling())


def _last_shift(model: torch.nn.Module) -> int:
    """Cyclic shift of the last block (Swin; 0 elsewhere)."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is not None:
        return int(getattr(layers[-1].blocks[-1], "shift_size", 0))
    return 0


def received_attention(probs: torch.Tensor, batch: int, height: int, width: int, shift: int = 0) -> torch.Tensor:
    """Window attention of one block -> attention each token receives, `[B, H, W]`.

    Args:
        probs: `[B * nW, heads, ws*ws, ws*ws]` attention probabilities over the (zero-padded to a
            multiple of ws, cyclically shifted by `shift`) `H x W` token map, windows in row-major
            order (Swin and CvT).
        batch, height, width: the batch size and the token map before padding.
        shift: the block's cyclic shift (Swin's shifted windows), undone here.

    Each key token's value is its attention averaged over heads and over the queries of its window.
    """
    n = probs.shape[-1]
    ws = math.isqrt(n)
    if ws * ws != n:
        raise ValueError(f"expected square windows, got {n} tokens per window.")
    rows, cols = -(-height // ws), -(-width // ws)
    if probs.shape[0] != batch * rows * cols:
        raise ValueError(
            f"{probs.shape[0]} windows do not tile a {height}x{width} map in {ws}x{ws} windows for a batch of {batch}."
        )
    received = probs.float().mean(dim=1).mean(dim=1)  # [B*nW, N]: mean over heads, then over queries
    received = received.view(batch, rows, cols, ws, ws).permute(0, 1, 3, 2, 4).reshape(batch, rows * ws, cols * ws)
    if shift:
        received = torch.roll(received, shifts=(shift, shift), dims=(1, 2))
    return received[:, :height, :width]


def attention_note(config) -> str | None:
    """Why the attention figure cannot be drawn for `config`, or None when it can."""
    if config.backbone_type in WINDOW_ATTENTION_FAMILIES:
        return None
    if config.backbone_type == "vil" and config.vil_attention_types[-1] == "full":
        return None
    return (
        f"attention maps are drawn for window attention (Swin, CvT) and full attention (ViL with a 'full' last "
        f"stage); this {config.backbone_type} model's last stage uses "
        f"{getattr(config, 'vil_attention_types', ('another',))[-1]} attention."
    )


def _attention_map(model: torch.nn.Module, probs: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """`[B, h, w]` attention received by each last-stage token, for every supported family."""
    config = model.config
    if config.backbone_type in WINDOW_ATTENTION_FAMILIES:
        return received_attention(probs, batch, height, width, _last_shift(model))
    # ViL, full attention: [B, heads, g + L, g + L], the global tokens first.
    received = probs.float().mean(dim=1).mean(dim=1)[:, config.vil_num_global_tokens[-1] :]  # [B, L]
    return received.reshape(batch, height, width)


@torch.no_grad()
def analyse_regions(model: torch.nn.Module, pixel_values: torch.Tensor, with_attention: bool = True) -> list:
    """Region features, their grid and (where the family allows) the attention map of each view.

    `pixel_values` is `[B, 3, H, W]`. The model runs in eval mode (BatchNorm statistics are left
    untouched) and is put back into its previous mode afterwards.
    """
    model = _backbone(model)
    config = model.config
    with_attention = with_attention and attention_note(config) is None
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        out = model(pixel_values, output_hidden_states=True, output_attentions=with_attention, return_dict=True)
    finally:
        model.train(was_training)
    batch = pixel_values.shape[0]
    h, w = out.feature_maps[-1].shape[-2:]
    features = out.last_hidden_state.float().cpu()  # [B, L, C]
    if features.shape[1] != h * w:
        raise ValueError(f"{features.shape[1]} region tokens do not match the last-stage map {h}x{w}.")
    attention = None
    if with_attention:
        attention = _attention_map(model, out.attentions[-1], batch, h, w).cpu().numpy()
    stride = _token_stride(config)
    image_hw = tuple(pixel_values.shape[-2:])
    return [
        RegionAnalysis(features[i], (h, w), stride, image_hw, None if attention is None else attention[i])
        for i in range(batch)
    ]


def match_regions(view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EsViT's region matching: for each row of `view1 [L1, C]`, the row of `view2 [L2, C]` of the
    highest cosine similarity. Returns `(index [L1], similarity [L1])`."""
    a = torch.nn.functional.normalize(view1.float(), dim=-1)
    b = torch.nn.functional.normalize(view2.float(), dim=-1)
    similarity, index = (a @ b.T).max(dim=1)
    return index, similarity


def pca_colors(features: torch.Tensor, components: int = 3) -> np.ndarray:
    """`[L, C]` -> `[L, components]` in [0, 1]: projections on the first principal components,
    each min-max scaled; signs fixed so that the largest projection is positive."""
    x = features.double() - features.double().mean(dim=0, keepdim=True)
    out = np.zeros((x.shape[0], components))
    if x.shape[0] < 2:
        return out
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    projections = (x @ vh[:components].T).numpy()  # [L, k], k <= components
    for i in range(projections.shape[1]):
        p = projections[:, i]
        if abs(p.min()) > abs(p.max()):
            p = -p
        out[:, i] = _normalise01(p)
    return out


# ---------------------------------------------------------------------------------- figures
def default_augmentation(config, recipe: str | None = None, **overrides):
    """The pretraining augmentation for `config`'s image size, or a recipe's crop settings.

    Without a recipe: global crops of `config.image_size`, local crops of 96/224 of it. `overrides`
    are `DataArguments` fields (`local_crop_size`, `num_local_crops`, `blur_probs`, ...); None
    values are ignored. Built by `esvit.training.multicrop.build_augmentation`, as pretraining
    builds it, without importing `datasets`.
    """
    from ..training.arguments import DataArguments
    from ..training.multicrop import build_augmentation

    values = dict(global_crop_size=config.image_size, local_crop_size=max(8, round(config.image_size * 96 / 224)))
    if recipe is not None:
        from ..training.recipes import get_recipe

        values.update({k: v for k, v in get_recipe(recipe).items() if k in DataArguments.__dataclass_fields__})
    values.update({k: v for k, v in overrides.items() if v is not None})
    crop_fields = ("global_crop_size", "global_crops_scale", "local_crop_size", "num_local_crops")
    crop_fields += ("local_crops_scale", "blur_probs")
    args = DataArguments(**{k: v for k, v in values.items() if k in crop_fields})  # validates the values
    return build_augmentation(args)


def _eval_view(image: Image.Image, size: int) -> torch.Tensor:
    """The whole image as the model sees it in evaluation: shorter side resized to `size`
    (bicubic), centre crop, ImageNet normalisation (`evaluation.data.build_eval_transform` with
    no margin, so a square image is shown entirely)."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform(image.convert("RGB"))


@dataclass
class ImagePanels:
    """The drawn pieces of one image, at the display size; None where not drawn.

    `crops`: `(title, panel)` of every multi-crop view; `view`: the whole image as the model saw
    it; `attention`, `attention_overlay`: the heat map alone and over `view`; `pca`, `pca_overlay`:
    the PCA colours alone and over `view`; `matching`: the two global views joined by the lines of
    the region matching, with its caption `matching_title`; `grid`: the last-stage token map of `view`.
    """

    crops: list[tuple[str, Image.Image]] | None = None
    view: Image.Image | None = None
    attention: Image.Image | None = None
    attention_overlay: Image.Image | None = None
    pca: Image.Image | None = None
    pca_overlay: Image.Image | None = None
    matching: Image.Image | None = None
    matching_title: str = ""
    grid: tuple[int, int] | None = None


def crop_panels(crops: Sequence[torch.Tensor], panel_size: int = DEFAULT_PANEL_SIZE) -> list:
    """`(title, panel)` of each multi-crop view: 2 global, then the local ones, at their relative sizes."""
    global_side = crops[0].shape[-1]
    panels = []
    for i, crop in enumerate(crops):
        side = max(8, round(panel_size * crop.shape[-1] / global_side))
        name = f"global {i + 1}" if i < 2 else f"local {i - 1}"
        panels.append((f"{name} ({crop.shape[-1]} px)", _resize(unnormalize(crop), (side, side))))
    return panels


def attention_panels(view: Image.Image, analysis: RegionAnalysis) -> tuple[Image.Image, Image.Image]:
    """(heat map, heat map over `view`) of the attention each last-stage token receives."""
    size = view.size
    heat = _upsample_grid(analysis.attention, analysis.stride, analysis.image_hw, size[::-1], smooth=True)
    colours = colormap(_normalise01(heat))
    return Image.fromarray(colours), _blend(view, colours)


def pca_panels(view: Image.Image, analysis: RegionAnalysis) -> tuple[Image.Image, Image.Image]:
    """(PCA colours of the region features, the same over `view`); each region keeps its square."""
    h, w = analysis.grid
    rgb = pca_colors(analysis.features).reshape(h, w, 3)
    upsampled = _upsample_grid(rgb, analysis.stride, analysis.image_hw, view.size[::-1], smooth=False)
    colours = np.round(np.clip(upsampled, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(colours), _blend(view, colours, alpha=0.6)


def matching_panel(
    view1: torch.Tensor,
    view2: torch.Tensor,
    analysis1: RegionAnalysis,
    analysis2: RegionAnalysis,
    panel_size: int = DEFAULT_PANEL_SIZE,
    max_lines: int = 64,
) -> tuple[Image.Image, str]:
    """The two views side by side, a line from each region of view 1 to its best match in view 2
    (the `max_lines` most similar pairs when there are more), and a caption."""
    gap = max(24, panel_size // 4)
    size = (panel_size, panel_size)
    canvas = Image.new("RGB", (2 * panel_size + gap, panel_size), _BACKGROUND)
    canvas.paste(_resize(unnormalize(view1), size), (0, 0))
    canvas.paste(_resize(unnormalize(view2), size), (panel_size + gap, 0))
    draw = ImageDraw.Draw(canvas)

    def centres(analysis: RegionAnalysis, x0: int) -> list[tuple[float, float]]:
        (h, w), s, (height, width) = analysis.grid, analysis.stride, analysis.image_hw
        sy, sx = panel_size / height, panel_size / width
        return [
            (x0 + min((c + 0.5) * s, width - 0.5) * sx, min((r + 0.5) * s, height - 0.5) * sy)
            for r in range(h)
            for c in range(w)
        ]

    for analysis, x0 in ((analysis1, 0), (analysis2, panel_size + gap)):  # the region grid, in white
        (h, w), s, (height, width) = analysis.grid, analysis.stride, analysis.image_hw
        for r in range(1, h):
            y = min(r * s, height) * panel_size / height
            draw.line([(x0, y), (x0 + panel_size - 1, y)], fill=(255, 255, 255), width=1)
        for c in range(1, w):
            x = x0 + min(c * s, width) * panel_size / width
            draw.line([(x, 0), (x, panel_size - 1)], fill=(255, 255, 255), width=1)

    index, similarity = match_regions(analysis1.features, analysis2.features)
    points1, points2 = centres(analysis1, 0), centres(analysis2, panel_size + gap)
    order = torch.argsort(similarity, descending=True)[:max_lines].tolist()
    line_width = max(1, round(panel_size / 80))
    radius = max(2, panel_size // 64)
    for i in order:
        colour = _PALETTE[i % len(_PALETTE)]
        (x1, y1), (x2, y2) = points1[i], points2[int(index[i])]
        draw.line([(x1, y1), (x2, y2)], fill=colour, width=line_width)
        for x, y in ((x1, y1), (x2, y2)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))
    shown = f"{len(order)} of {len(points1)}" if len(order) < len(points1) else f"{len(points1)}"
    return canvas, f"{shown} regions of global 1 -> most similar of global 2 (mean cos {similarity.mean():.2f})"


def _resized_view(crop: torch.Tensor, size: int | None) -> torch.Tensor:
    """A normalised crop resampled (bicubic) to `size` px, for the model; unchanged when None or equal."""
    if size is None or crop.shape[-1] == size:
        return crop
    return torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]


def draw_image(
    model: torch.nn.Module,
    image: Image.Image,
    augmentation=None,
    *,
    kinds: Sequence[str] = FIGURE_KINDS,
    seed: int = 0,
    image_size: int | None = None,
    panel_size: int = DEFAULT_PANEL_SIZE,
) -> ImagePanels:
    """Run the model on one image and draw the pieces of the figures `kinds` (see `visualize_image`)."""
    unknown = set(kinds) - set(FIGURE_KINDS)
    if unknown:
        raise ValueError(f"unknown figure kinds {sorted(unknown)}; choose from {FIGURE_KINDS}.")
    backbone = _backbone(model)
    config = backbone.config
    image = image.convert("RGB")
    panels = ImagePanels()
    if "crops" in kinds or "correspondence" in kinds:
        augmentation = augmentation or default_augmentation(config)
        crops = augmentation(image, seed=seed)
        panels.crops = crop_panels(crops, panel_size)
    if "attention" in kinds or "pca" in kinds:
        view = _eval_view(image, image_size or config.image_size)
        (analysis,) = analyse_regions(backbone, view[None], with_attention="attention" in kinds)
        panels.view = _resize(unnormalize(view), (panel_size, panel_size))
        panels.grid = analysis.grid
        if "attention" in kinds:
            if analysis.attention is None:
                logger.warning("attention figure skipped: %s", attention_note(config))
            else:
                panels.attention, panels.attention_overlay = attention_panels(panels.view, analysis)
        if "pca" in kinds:
            panels.pca, panels.pca_overlay = pca_panels(panels.view, analysis)
    if "correspondence" in kinds:
        # The model sees the two global crops at `image_size` when given (more region tokens).
        pair = torch.stack([_resized_view(crops[0], image_size), _resized_view(crops[1], image_size)])
        first, second = analyse_regions(backbone, pair, with_attention=False)
        panels.matching, panels.matching_title = matching_panel(crops[0], crops[1], first, second, panel_size)
    if "crops" not in kinds:
        panels.crops = None
    return panels


_FIGURE_TITLES = {
    "crops": "multi-crop views of pretraining",
    "attention": "teacher attention, last stage",
    "correspondence": "region matching between two views",
    "pca": "region features, first 3 principal components as RGB",
}


def figures_of(panels: ImagePanels) -> dict[str, np.ndarray]:
    """The stand-alone figures `{kind: uint8 [H, W, 3]}` of one image's panels."""
    figures = {}
    if panels.crops:
        figures["crops"] = _hstack([_titled(panel, title) for title, panel in panels.crops])
    if panels.attention is not None:
        h, w = panels.grid
        figures["attention"] = _hstack(
            [
                _titled(panels.view, "input"),
                _titled(panels.attention_overlay, f"attention received ({h}x{w} tokens)"),
                _titled(panels.attention, "last block, mean of heads"),
            ]
        )
    if panels.matching is not None:
        figures["correspondence"] = _titled(panels.matching, panels.matching_title)
    if panels.pca is not None:
        h, w = panels.grid
        figures["pca"] = _hstack(
            [
                _titled(panels.view, "input"),
                _titled(panels.pca, f"PCA of {h * w} region features"),
                _titled(panels.pca_overlay, "over the input"),
            ]
        )
    return {k: np.asarray(_framed(figures[k], _FIGURE_TITLES[k])) for k in FIGURE_KINDS if k in figures}


def visualize_image(
    model: torch.nn.Module,
    image: Image.Image,
    augmentation=None,
    *,
    kinds: Sequence[str] = FIGURE_KINDS,
    seed: int = 0,
    image_size: int | None = None,
    panel_size: int = DEFAULT_PANEL_SIZE,
) -> dict[str, np.ndarray]:
    """The figures of one image, `{kind: uint8 [H, W, 3]}` (kinds that cannot be drawn are left
    out, with a logged reason).

    Args:
        model: an `EsViTModel` (or `EsViTForPreTraining`), e.g. the teacher.
        image: a PIL image (any mode).
        augmentation: the multi-crop augmentation (default: `default_augmentation(model.config)`).
        kinds: a subset of `FIGURE_KINDS`.
        seed: the augmentation seed (same seed, same crops: pictures of successive training steps
            stay comparable).
        image_size: side at which the model sees the whole image (attention, PCA) and the two
            global crops (correspondence); default: the model's `image_size` and the crops' own
            size. Larger values give more region tokens (4x4 instead of 2x2 for a 64-px Swin-micro).
        panel_size: display side of a global view.
    """
    panels = draw_image(
        model, image, augmentation, kinds=kinds, seed=seed, image_size=image_size, panel_size=panel_size
    )
    return figures_of(panels)


def render_figures(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    augmentation=None,
    *,
    kinds: Sequence[str] = FIGURE_KINDS,
    seed: int = 0,
    image_size: int | None = None,
    panel_size: int = DEFAULT_PANEL_SIZE,
) -> dict[str, np.ndarray]:
    """The figures of several images for TensorBoard: `{"<kind>/<i>": uint8 [H, W, 3]}`.

    Log them with `writer.add_image(tag, array, step, dataformats="HWC")`. Image `i` uses the
    augmentation seed `seed + i`; see `visualize_image` for the arguments.
    """
    out = {}
    for i, image in enumerate(images):
        figures = visualize_image(
            model, image, augmentation, kinds=kinds, seed=seed + i, image_size=image_size, panel_size=panel_size
        )
        out.update({f"{kind}/{i}": array for kind, array in figures.items()})
    return out


def _tile(panels: Sequence[Image.Image], side: int, gap: int = 4) -> Image.Image:
    """Small panels in a square-ish grid that fits into `side x side`."""
    columns = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    cell = max(4, (side - gap * (columns - 1)) // columns)
    out = Image.new("RGB", (side, side), _BACKGROUND)
    top = (side - (rows * cell + gap * (rows - 1))) // 2
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        out.paste(panel.resize((cell, cell), Image.BICUBIC), (c * (cell + gap), top + r * (cell + gap)))
    return out


def summary_figure(rows: Sequence[ImagePanels]) -> Image.Image:
    """One row per image: the 2 global crops, the local crops (tiled), the attention over the
    image, the region matching between the global crops, and the PCA over the image; a header
    line names the columns once."""
    header_font = _font(14)
    table = []
    for panels in rows:
        cells: list[tuple[str, Image.Image]] = []
        if panels.crops:
            side = panels.crops[0][1].width
            cells += [("global crop 1", panels.crops[0][1]), ("global crop 2", panels.crops[1][1])]
            if len(panels.crops) > 2:
                cells.append((f"{len(panels.crops) - 2} local crops", _tile([p for _, p in panels.crops[2:]], side)))
        if panels.attention_overlay is not None:
            cells.append(("teacher attention, last stage", panels.attention_overlay))
        if panels.matching is not None:
            cells.append(("region matching: global 1 -> global 2", panels.matching))
        if panels.pca_overlay is not None:
            cells.append((f"PCA of the {panels.grid[0]}x{panels.grid[1]} region features", panels.pca_overlay))
        table.append(cells)
    if not table or not table[0]:
        raise ValueError("nothing to summarise: no image, or no figure could be drawn.")
    headers = [title for title, _ in table[0]]
    widths = [max(cells[i][1].width for cells in table) for i in range(len(headers))]
    heights = [max(p.height for _, p in cells) for cells in table]
    gap, line_height = 2 * _GAP, 18
    header_lines = [_wrap(title, header_font, width) for title, width in zip(headers, widths)]
    strip = 6 + line_height * max(len(lines) for lines in header_lines)
    canvas = Image.new(
        "RGB", (sum(widths) + gap * (len(widths) + 1), strip + sum(heights) + gap * len(heights)), _BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    x = gap
    for lines, width in zip(header_lines, widths):
        for j, line in enumerate(lines):
            left, _, right, _ = draw.textbbox((0, 0), line, font=header_font)
            draw.text((x + (width - (right - left)) // 2, 3 + j * line_height), line, fill=_TEXT, font=header_font)
        x += width + gap
    y = strip
    for cells, height in zip(table, heights):
        x = gap
        for (_, panel), width in zip(cells, widths):
            canvas.paste(panel, (x + (width - panel.width) // 2, y + (height - panel.height) // 2))
            x += width + gap
        y += height + gap
    return canvas


# -------------------------------------------------------------------------------------- CLI
def _dataset_arguments(source: str, config_name: str | None, split: str, image_column: str | None, num: int):
    """`DataArguments` reading `source` like `run_linear_probe.py` does: a parquet / arrow / image
    file, a `save_to_disk` folder, an image folder or a folder of parquet / arrow files, or a Hub id
    (streamed, so only `num` images are downloaded)."""
    from ..training.arguments import DataArguments

    common = dict(image_column=image_column, max_train_samples=num, dataset_split=split)
    path = Path(source)
    if path.is_file():
        return DataArguments(train_files=[str(path)], **common)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return DataArguments(dataset_from_disk=str(path), **common)
        for suffix in (".parquet", ".arrow"):
            files = sorted(str(p) for p in path.rglob(f"*{suffix}"))
            if files:
                return DataArguments(train_files=files, **common)
        return DataArguments(train_dir=str(path), **common)
    return DataArguments(dataset_name=source, dataset_config_name=config_name, streaming=True, **common)


def load_images(args: argparse.Namespace) -> list[tuple[str, Image.Image]]:
    """`(name, PIL image)` of `--images` and of the first `--num_images` of `--dataset`."""
    from ..images import read_image_bytes

    images = []
    for file in args.images or []:
        images.append((Path(file).stem, decode_image(Path(file).read_bytes())))
    if args.dataset:
        from ..training.data import load_pretraining_images

        data_args = _dataset_arguments(
            args.dataset, args.dataset_config_name, args.split, args.image_column, args.num_images
        )
        for row, example in enumerate(load_pretraining_images(data_args)):
            images.append((f"{Path(args.dataset).stem}_{row}", decode_image(read_image_bytes(example["image"]))))
    if not images:
        raise SystemExit("visualize: error: give --images FILE ... and/or --dataset SOURCE.")
    return images


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m esvit.evaluation.visualize",
        description="Draw the multi-crop views, the last-stage attention, the region matching and a PCA of the "
        "region features of an EsViT model, one PNG per image and figure.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="EsViT folder (e.g. <run>/model) or Hub id.")
    parser.add_argument("--images", nargs="+", help="Image files.")
    parser.add_argument(
        "--dataset",
        help="Images from a datasets source: parquet/arrow file, save_to_disk folder, image folder, or Hub id.",
    )
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--split", default="train", help="Split of a Hub or save_to_disk dataset.")
    parser.add_argument("--image_column", help="Default: guessed (image, img, ...).")
    parser.add_argument("--num_images", type=int, default=4, help="Images taken from --dataset.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kinds", nargs="+", default=list(FIGURE_KINDS), choices=FIGURE_KINDS)
    parser.add_argument("--seed", type=int, default=0, help="Augmentation seed (image i uses seed + i).")
    parser.add_argument("--image_size", type=int, help="Whole-image view side; default: the model's image_size.")
    parser.add_argument("--panel_size", type=int, default=DEFAULT_PANEL_SIZE, help="Display side of a global view.")
    parser.add_argument("--recipe", help="Take the crop settings from this pretraining recipe.")
    parser.add_argument("--global_crop_size", type=int)
    parser.add_argument("--global_crops_scale", type=float, nargs=2)
    parser.add_argument("--local_crop_size", type=int)
    parser.add_argument("--num_local_crops", type=int)
    parser.add_argument("--local_crops_scale", type=float, nargs=2)
    parser.add_argument("--blur_probs", type=float, nargs=3)
    parser.add_argument(
        "--summary", help="Also write one PNG of all images: a row per image (crops, attention, matching, PCA)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--revision")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.panel_size < 16:
        parser.error("--num_images must be >= 1 and --panel_size >= 16.")
    return args


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    from .. import EsViTModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A `pretraining/` folder (backbone + heads) loads too: the heads are dropped.
    model = EsViTModel.from_pretrained(args.model_name_or_path, revision=args.revision)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    """Write the PNGs; return `{image name: [written paths]}`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    model = _load_model(args)
    augmentation = default_augmentation(
        _backbone(model).config,
        recipe=args.recipe,
        global_crop_size=args.global_crop_size,
        global_crops_scale=args.global_crops_scale,
        local_crop_size=args.local_crop_size,
        num_local_crops=args.num_local_crops,
        local_crops_scale=args.local_crops_scale,
        blur_probs=args.blur_probs,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    written: dict[str, list[str]] = {}
    rows = []
    for i, (name, image) in enumerate(load_images(args)):
        panels = draw_image(
            model,
            image,
            augmentation,
            kinds=args.kinds,
            seed=args.seed + i,
            image_size=args.image_size,
            panel_size=args.panel_size,
        )
        rows.append(panels)
        for kind, array in figures_of(panels).items():
            path = os.path.join(args.output_dir, f"{name}_{kind}.png")
            Image.fromarray(array).save(path, optimize=True)
            written.setdefault(name, []).append(path)
    count = sum(len(v) for v in written.values())
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        summary_figure(rows).save(args.summary, optimize=True)
        written["summary"] = [args.summary]
    logger.info("wrote %d figures of %d images to %s", count, len(rows), args.output_dir)
    return written


if __name__ == "__main__":
    main()
