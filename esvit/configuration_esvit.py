"""EsViT configuration: one config class for the three multi-stage backbone families.

EsViT (Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning",
ICLR 2022, arXiv:2106.09785) pairs a multi-stage backbone (Swin, Vision Longformer, CvT-v4) with two
DINO heads: a view-level head on the pooled feature and a region-level (dense) head on every
last-stage token. `backbone_type` selects the family; the per-stage tuples (`hidden_sizes`,
`depths`, `num_heads`, ...) describe the pyramid for all of them, and a few `vil_*` / `cvt_*`
fields hold what only one family needs.

Every released architecture is a named preset: ``EsViTConfig.from_preset("swin-tiny-w7")``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

BACKBONE_TYPES = ("swin", "vil", "cvt")
VIL_ATTENTION_TYPES = ("longformer", "full")


@strict
class EsViTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of an EsViT backbone and its two pretraining heads.

    Shared fields (all families):
        backbone_type: "swin", "vil" or "cvt".
        image_size: the training resolution. Swin attention windows and ViL/CvT relative-position
            tables are sized for it; other input sizes (e.g. 96-px local crops) are padded as the
            original code does.
        hidden_sizes / depths / num_heads: width, number of blocks and heads of each stage.
        patch_sizes: patch (or convolution-kernel) size of each stage's embedding. Swin uses only
            the first entry (later stages merge 2x2 patches).
        patch_strides / patch_padding: CvT convolutional embeddings (stride and zero padding).
        window_size: attention window (Swin window, ViL local chunk size, CvT window).
        mlp_ratio, qkv_bias, drop_path_rate, hidden_dropout_prob, attention_probs_dropout_prob.
        layer_norm_eps: 1e-6 for Swin and ViL, 1e-5 for CvT (as the original builds them).
        use_absolute_embeddings: Swin's `ape` / ViL's `a1` absolute position embeddings.
        patch_norm: LayerNorm after the patch embedding (Swin `patch_norm`, ViL `norm_embed`).

    ViL only:
        vil_attention_types: per stage, "longformer" (2-D sliding-chunk attention) or "full".
        vil_num_global_tokens: per stage, number of global tokens (0 or 1 in released models).
        vil_mode: 0 = all 9 neighbouring chunks; >0 = one random neighbour chunk per layer while
            training (eval always uses all 9).

    CvT only:
        cvt_qkv_kernel_size / cvt_qkv_padding: the depthwise convolution of the q/k/v projection.

    Heads (used by `EsViTForPreTraining`; the DINO head of Caron et al. 2021):
        head_hidden_dim, head_bottleneck_dim, head_out_dim, head_num_layers, head_use_bn,
        head_norm_last_layer.

    Features:
        n_last_blocks: how many final blocks the linear-probe feature concatenates (paper: 4).
        out_features / out_indices: stages `EsViTBackbone` returns ("stem", "stage1", ...).
    """

    model_type = "esvit"
    attribute_map = {"hidden_size": "last_hidden_size", "num_hidden_layers": "num_blocks"}

    backbone_type: str = "swin"
    image_size: int = 224
    num_channels: int = 3
    hidden_sizes: tuple[int, ...] | list[int] = (96, 192, 384, 768)
    depths: tuple[int, ...] | list[int] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] | list[int] = (3, 6, 12, 24)
    patch_sizes: tuple[int, ...] | list[int] = (4, 2, 2, 2)
    patch_strides: tuple[int, ...] | list[int] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] | list[int] = (0, 0, 0, 0)
    window_size: int = 7
    mlp_ratio: float | int = 4.0
    qkv_bias: bool = True
    drop_path_rate: float | int = 0.1
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-6
    use_absolute_embeddings: bool = False
    patch_norm: bool = True
    initializer_range: float = 0.02

    vil_attention_types: tuple[str, ...] | list[str] = ("longformer", "longformer", "full", "full")
    vil_num_global_tokens: tuple[int, ...] | list[int] = (1, 1, 1, 0)
    vil_mode: int = 0

    cvt_qkv_kernel_size: int = 3
    cvt_qkv_padding: int = 1

    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_out_dim: int = 65536
    head_num_layers: int = 3
    head_use_bn: bool = False
    head_norm_last_layer: bool = True

    n_last_blocks: int = 4
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        # JSON gives lists back; keep tuples so that configs compare equal after a round trip.
        for name in (
            "hidden_sizes",
            "depths",
            "num_heads",
            "patch_sizes",
            "patch_strides",
            "patch_padding",
            "vil_attention_types",
            "vil_num_global_tokens",
        ):
            setattr(self, name, tuple(getattr(self, name)))
        # `AutoBackbone` support: "stem" is the patch embedding, "stage<i>" the output of stage i.
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_features=kwargs.pop("out_features", None), out_indices=kwargs.pop("out_indices", None)
        )
        super().__post_init__(**kwargs)

    # ----------------------------------------------------------------------------------- derived
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def last_hidden_size(self) -> int:
        """Width of the pooled / region features (the last stage)."""
        return self.hidden_sizes[-1]

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def n_last_blocks_dim(self, n: int | None = None) -> int:
        """Width of the linear-probe feature: the widths of the last `n` blocks, summed."""
        n = self.n_last_blocks if n is None else n
        widths = [w for w, d in zip(self.hidden_sizes, self.depths) for _ in range(d)]
        return sum(widths[-n:])

    # ---------------------------------------------------------------------------------- checks
    def validate_architecture(self):
        """Part of `@strict` validation: reject configurations that cannot build a model."""
        if self.backbone_type not in BACKBONE_TYPES:
            raise ValueError(f"backbone_type must be one of {BACKBONE_TYPES}, got {self.backbone_type!r}.")
        for name in ("image_size", "num_channels", "window_size", "vil_mode", "n_last_blocks", "head_out_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}.")
        for name in ("hidden_sizes", "depths", "num_heads", "patch_sizes", "patch_strides", "patch_padding"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, name)):
                raise TypeError(f"{name} must hold ints, got {getattr(self, name)!r}.")
        n = len(self.depths)
        if n == 0:
            raise ValueError("depths must name at least one stage.")
        per_stage = {
            "hidden_sizes": self.hidden_sizes,
            "num_heads": self.num_heads,
            "patch_sizes": self.patch_sizes,
        }
        if self.backbone_type == "cvt":
            per_stage.update(patch_strides=self.patch_strides, patch_padding=self.patch_padding)
        if self.backbone_type == "vil":
            per_stage.update(
                vil_attention_types=self.vil_attention_types, vil_num_global_tokens=self.vil_num_global_tokens
            )
        for name, values in per_stage.items():
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but depths has {n} stages; give one per stage.")
        for name in ("depths", "hidden_sizes", "num_heads", "patch_sizes"):
            bad = [v for v in getattr(self, name) if v <= 0]
            if bad:
                raise ValueError(f"every entry of {name} must be positive, got {tuple(getattr(self, name))}.")
        for i, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_heads)):
            if width % heads != 0:
                raise ValueError(f"stage {i + 1}: hidden size {width} is not divisible by its {heads} attention heads.")
        if self.image_size <= 0 or self.window_size <= 0:
            raise ValueError("image_size and window_size must be positive.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}.")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if self.backbone_type == "swin":
            expected = tuple(self.hidden_sizes[0] * 2**i for i in range(n))
            if tuple(self.hidden_sizes) != expected:
                raise ValueError(
                    f"Swin doubles its width at every patch merging: hidden_sizes must be {expected}, "
                    f"got {tuple(self.hidden_sizes)}."
                )
        if self.backbone_type == "vil":
            bad = [t for t in self.vil_attention_types if t not in VIL_ATTENTION_TYPES]
            if bad:
                raise ValueError(f"vil_attention_types entries must be in {VIL_ATTENTION_TYPES}, got {bad}.")
            if any(g < 0 for g in self.vil_num_global_tokens):
                raise ValueError("vil_num_global_tokens must be >= 0.")
            if self.vil_mode < 0:
                raise ValueError(f"vil_mode must be >= 0, got {self.vil_mode}.")
        if self.backbone_type == "cvt":
            k, p = self.cvt_qkv_kernel_size, self.cvt_qkv_padding
            if k < 1 or k % 2 == 0 or p != (k - 1) // 2:
                raise ValueError(
                    f"CvT's depthwise q/k/v convolution must keep the map size: cvt_qkv_kernel_size must be "
                    f"odd and cvt_qkv_padding == (kernel - 1) // 2, got kernel {k}, padding {p}."
                )
            if self.use_absolute_embeddings or not self.patch_norm:
                raise ValueError(
                    "CvT-v4 has no absolute position embedding and always normalises its patch embedding: "
                    "use_absolute_embeddings must be False and patch_norm True."
                )
            if any(s < 1 for s in self.patch_strides) or any(p < 0 for p in self.patch_padding):
                raise ValueError("patch_strides must be >= 1 and patch_padding >= 0.")
        if self.head_out_dim <= 0 or self.head_hidden_dim <= 0 or self.head_bottleneck_dim <= 0:
            raise ValueError("head_out_dim, head_hidden_dim and head_bottleneck_dim must be positive.")
        if self.head_num_layers < 1:
            raise ValueError(f"head_num_layers must be >= 1, got {self.head_num_layers}.")
        if not 1 <= self.n_last_blocks <= self.num_blocks:
            raise ValueError(f"n_last_blocks must lie in [1, {self.num_blocks}], got {self.n_last_blocks}.")

    # --------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> EsViTConfig:
        """Build the configuration of a released architecture, e.g. ``"swin-tiny-w7"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown EsViT preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
        return cls(**{**PRESETS[name], **overrides})


def _swin(embed_dim: int, depths, heads, window: int, drop_path: float) -> dict:
    return dict(
        backbone_type="swin",
        hidden_sizes=tuple(embed_dim * 2**i for i in range(4)),
        depths=depths,
        num_heads=heads,
        patch_sizes=(4, 2, 2, 2),
        window_size=window,
        drop_path_rate=drop_path,
        layer_norm_eps=1e-6,
    )


def _cvt(widths, depths, heads, drop_path: float) -> dict:
    return dict(
        backbone_type="cvt",
        hidden_sizes=widths,
        depths=depths,
        num_heads=heads,
        patch_sizes=(7, 3, 3, 3),
        patch_strides=(4, 2, 2, 2),
        patch_padding=(2, 1, 1, 1),
        window_size=7,
        drop_path_rate=drop_path,
        layer_norm_eps=1e-5,
    )


#: Released (and configured) EsViT architectures, by name. Parameter counts (backbone only) are
#: checked against the original in tests/test_presets.py and listed in the README.
PRESETS: dict[str, dict] = {
    "swin-tiny-w7": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 0.1),
    "swin-small-w7": _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 0.2),
    "swin-base-w7": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 0.2),
    "swin-large-w7": _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 0.2),
    "swin-tiny-w14": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 14, 0.1),
    "swin-small-w14": _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 14, 0.2),
    "swin-base-w14": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 14, 0.2),
    "vil-2262": dict(
        backbone_type="vil",
        hidden_sizes=(96, 192, 384, 768),
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        patch_sizes=(4, 2, 2, 2),
        window_size=7,
        drop_path_rate=0.1,
        layer_norm_eps=1e-6,
        vil_attention_types=("longformer", "longformer", "full", "full"),
        vil_num_global_tokens=(1, 1, 1, 0),
        vil_mode=1,
    ),
    "cvt-s1": _cvt((64, 192, 384, 768), (2, 2, 6, 2), (1, 3, 6, 12), 0.1),
    "cvt-s3": _cvt((64, 128, 256, 512), (2, 2, 10, 4), (2, 4, 8, 16), 0.2),
    # A tiny Swin for tests, the embedded pretraining default and quick experiments.
    "swin-micro": dict(
        _swin(16, (1, 1, 2, 1), (1, 2, 2, 4), 7, 0.0),
        head_hidden_dim=128,
        head_bottleneck_dim=64,
        head_out_dim=1024,
    ),
}

__all__ = ["EsViTConfig", "PRESETS"]
