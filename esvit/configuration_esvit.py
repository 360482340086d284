"""EsViT configuration: one config class for the three multi-stage backbone families.

EsViT (Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning",
ICLR 2022, arXiv:2106.09785) pairs a multi-stage backbone (Swin, Vision Longformer, CvT-v4) with two
DINO heads: a view-level head on the pooled feature and a region-level (dense) head on every
last-stage token. `backbone_type` selects the family; the per-stage tuples (`hidden_sizes`,
`depths`, `num_heads`, ...) describe the pyramid for all of them, and a few `vil_*` / `cvt_*`
fields hold what only one family needs.

Every released architecture is a named preset: ``EsViTConfig.from_preset("swin-tiny-w7")``.
"""

# No `from __future__ import annotations` here: `@strict` checks a field's type only when its
# annotation is a real type, and postponed (string) annotations would switch every check off.
import dataclasses
import difflib
import functools
import inspect
import math
import types
from collections.abc import Iterable

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

BACKBONE_TYPES = ("swin", "vil", "cvt")
VIL_ATTENTION_TYPES = ("longformer", "full")

# Upper bounds, far above every released architecture (largest: swin-large-w7 with 24 blocks,
# widths up to 1536, 48 heads, window 14 in the W14 models, 65536 head outputs). They exist so
# that a typo (depths (2, 2, 1000000, 2)) fails at once instead of hanging or exhausting memory.
MAX_STAGES = 8
MAX_TOTAL_DEPTH = 100
MAX_WIDTH = 4096
MAX_HEADS = 128
MAX_IMAGE_SIZE = 2048
MAX_NUM_CHANNELS = 1024
MAX_PATCH_SIZE = 32  # patch / convolution kernel of a stage embedding
MAX_WINDOW_SIZE = 32
MAX_CVT_QKV_KERNEL = 15
MAX_MLP_RATIO = 16
MAX_VIL_GLOBAL_TOKENS = 16
MAX_VIL_FULL_ATTENTION_TOKENS = 4096  # its relative-position index holds tokens**2 entries
MAX_HEAD_OUT_DIM = 262_144
MAX_HEAD_WIDTH = 16_384  # head_hidden_dim and head_bottleneck_dim
MAX_HEAD_LAYERS = 8
MAX_PARAMETERS = 2_000_000_000  # backbone + both heads, estimated (swin-large-w7: about 0.24e9)


def _check_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}.")


@functools.cache
def _transformers_config_names() -> frozenset[str]:
    """Names that transformers itself may pass to a config's constructor, besides our fields.

    Loading a folder calls `EsViTConfig(**config_json)`, and `PreTrainedConfig.__post_init__`
    consumes or stores any extra key. We accept exactly what transformers knows: the data
    attributes and properties of `PreTrainedConfig` / `BackboneConfigMixin` (transformers_version,
    architectures, dtype, id2label, num_labels, out_features, ...), the keys its `__post_init__`
    pops (torch_dtype, attn_implementation, ...), the generation parameters it drops, and the
    common keys of configs written by transformers 4.x. Names starting with "_" are transformers'
    internal bookkeeping (`_commit_hash`, `_name_or_path`, ...) and are accepted as well.
    """
    names = set()
    for owner in (PreTrainedConfig, BackboneConfigMixin):
        for name in dir(owner):
            if not isinstance(inspect.getattr_static(owner, name), (types.FunctionType, classmethod, staticmethod)):
                names.add(name)
    names.update(
        (
            # popped by PreTrainedConfig.__post_init__ / from_dict, or written by save_pretrained
            "torch_dtype", "num_labels", "name_or_path", "attn_implementation", "experts_implementation",
            "output_attentions", "per_layer_config", "rope_scaling", "rope_theta", "auto_map", "model_type",
            "transformers_version", "stage_names", "out_features", "out_indices",
            # common keys of transformers 4.x configs
            "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
            "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
            "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "bos_token_id",
            "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
        )
    )  # fmt: skip
    try:
        from transformers import GenerationConfig

        names.update(GenerationConfig._get_default_generation_params())
    except (ImportError, AttributeError):  # another transformers version: nothing extra to drop
        pass
    return frozenset(names)


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
    layer_norm_eps: float | int = 1e-6
    use_absolute_embeddings: bool = False
    patch_norm: bool = True
    initializer_range: float | int = 0.02

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
        # Not a field and unknown to transformers: most likely a misspelled field, which would
        # otherwise be stored as a stray attribute and silently ignored.
        self.check_field_names(name for name in kwargs if not name.startswith("_"))
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

    # -------------------------------------------------------------------------------- geometry
    def stage_downsampling(self) -> tuple[tuple[int, int, int], ...]:
        """Per stage, `(kernel, stride, total_padding)` of the step that makes its token map from
        the previous map (the pixels, for stage 1): `side = (side + total_padding - kernel) // stride + 1`.

        Swin: a `p x p` patch projection, then 2x2 patch merging, which zero-pads an odd map (its
        side becomes ceil(side / 2)); ViL: non-overlapping `p x p` convolutions (a remainder is
        dropped); CvT: overlapping convolutions zero-padded on both sides.
        """
        if self.backbone_type == "swin":
            patch = self.patch_sizes[0]
            return ((patch, patch, 0),) + ((2, 2, 1),) * (self.num_stages - 1)
        if self.backbone_type == "cvt":
            return tuple(zip(self.patch_sizes, self.patch_strides, (2 * p for p in self.patch_padding)))
        return tuple((patch, patch, 0) for patch in self.patch_sizes)

    def stage_resolutions(self, size: int | None = None) -> tuple[int, ...]:
        """Side of each stage's token map for a `size x size` input (default: `image_size`), as the
        encoders compute it; 0 from the first stage whose map would be empty.

        Example: ``EsViTConfig.from_preset("swin-tiny-w7").stage_resolutions(96) == (24, 12, 6, 3)``.
        """
        side = self.image_size if size is None else size
        sides = []
        for kernel, stride, padding in self.stage_downsampling():
            side = max(0, (side + padding - kernel) // stride + 1) if side > 0 else 0
            sides.append(side)
        return tuple(sides)

    @property
    def min_input_size(self) -> int:
        """Smallest image height / width (pixels) the model accepts: the product of the stage
        strides, i.e. the pixels of one last-stage token (32 for every released model), and enough
        for a non-empty map in every stage. Smaller inputs would be made mostly of padding."""
        steps = self.stage_downsampling()
        need = 1  # smallest input side giving `need` tokens, from the last stage back to the pixels
        for kernel, stride, padding in reversed(steps):
            need = max(1, (need - 1) * stride + kernel - padding)
        return max(math.prod(stride for _, stride, _ in steps), need)

    def approx_num_parameters(self) -> int:
        """Estimated parameter count of the backbone and both heads (weights of the linear and
        convolutional layers; biases, norms and position tables are left out)."""
        widths = self.hidden_sizes
        blocks = sum(d * (4 + 2 * self.mlp_ratio) * w * w for d, w in zip(self.depths, widths))
        inputs = (self.num_channels,) + tuple(widths[:-1])
        embeddings = sum(k * k * c * w for (k, _, _), c, w in zip(self.stage_downsampling(), inputs, widths))
        dims = (
            [self.last_hidden_size] + [self.head_hidden_dim] * (self.head_num_layers - 1) + [self.head_bottleneck_dim]
        )
        head = sum(a * b for a, b in zip(dims, dims[1:])) + self.head_bottleneck_dim * self.head_out_dim
        return int(blocks + embeddings + 2 * head)

    # --------------------------------------------------------------------------- field names
    @classmethod
    def check_field_names(cls, names: Iterable[str]) -> None:
        """Raise `ValueError` for a name that is neither a field of `EsViTConfig` nor a key that
        transformers passes to configs (e.g. `transformers_version`, `auto_map`, `out_features`),
        naming the nearest field. Used for constructor keywords and by the training CLI's
        `--config_overrides`.

        Example:
            >>> EsViTConfig.check_field_names(["depths", "vil_num_global_token"])
            Traceback (most recent call last):
            ValueError: unknown EsViTConfig field 'vil_num_global_token'; did you mean 'vil_num_global_tokens'?
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | _transformers_config_names()
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"EsViTConfig field names are strings, got {name!r}.")
            if name in known:
                continue
            public = sorted(f for f in fields if not f.startswith("_"))
            close = difflib.get_close_matches(name, public, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are: {', '.join(public)}."
            raise ValueError(f"unknown EsViTConfig field {name!r}; {hint}")

    # ---------------------------------------------------------------------------------- checks
    # `@strict` checks each field's type (int, bool, tuple of ints, ...) whenever it is set, so the
    # checks below are about values only. It runs every `validate_*` method after `__init__`, in
    # alphabetical order (it finds them with `dir`) and stops at the first failure:
    # `validate_architecture` (stage structure, positive sizes) runs first and the others rely on
    # it, and `validate_cvt` (strides >= 1) runs before `validate_geometry` uses the strides.
    def validate_architecture(self):
        """A known family; 1 to MAX_STAGES stages; one entry per stage; sizes within bounds."""
        if self.backbone_type not in BACKBONE_TYPES:
            raise ValueError(f"backbone_type must be one of {BACKBONE_TYPES}, got {self.backbone_type!r}.")
        n = len(self.depths)
        if not 1 <= n <= MAX_STAGES:
            raise ValueError(f"depths must name between 1 and {MAX_STAGES} stages, got {n}.")
        per_stage = ["hidden_sizes", "num_heads", "patch_sizes"]
        per_stage += {
            "cvt": ["patch_strides", "patch_padding"],
            "vil": ["vil_attention_types", "vil_num_global_tokens"],
        }.get(self.backbone_type, [])
        for name in per_stage:
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but depths has {n} stages; give one per stage."
                )
        for name, limit in (
            ("depths", MAX_TOTAL_DEPTH),
            ("hidden_sizes", MAX_WIDTH),
            ("num_heads", MAX_HEADS),
            ("patch_sizes", MAX_PATCH_SIZE),
        ):
            values = tuple(getattr(self, name))
            if min(values) <= 0:
                raise ValueError(f"every entry of {name} must be positive, got {values}.")
            if max(values) > limit:
                raise ValueError(f"every entry of {name} must be at most {limit}, got {values}.")
        if self.num_blocks > MAX_TOTAL_DEPTH:
            raise ValueError(f"depths {self.depths} add up to {self.num_blocks} blocks; at most {MAX_TOTAL_DEPTH}.")
        for i, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_heads)):
            if width % heads != 0:
                raise ValueError(f"stage {i + 1}: hidden size {width} is not divisible by its {heads} attention heads.")

    def validate_geometry(self):
        """image_size, window and channels within bounds; image_size at least `min_input_size`."""
        _check_range("image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        _check_range("window_size", self.window_size, 1, MAX_WINDOW_SIZE)
        _check_range("num_channels", self.num_channels, 1, MAX_NUM_CHANNELS)
        if self.image_size < self.min_input_size:
            raise ValueError(
                f"image_size {self.image_size} is too small for this {self.backbone_type} configuration: it must be "
                f"at least {self.min_input_size} px, the total stride of its stages (one last-stage token)."
            )

    def validate_heads(self):
        """Head sizes within bounds; n_last_blocks names existing blocks."""
        _check_range("head_out_dim", self.head_out_dim, 1, MAX_HEAD_OUT_DIM)
        _check_range("head_hidden_dim", self.head_hidden_dim, 1, MAX_HEAD_WIDTH)
        _check_range("head_bottleneck_dim", self.head_bottleneck_dim, 1, MAX_HEAD_WIDTH)
        _check_range("head_num_layers", self.head_num_layers, 1, MAX_HEAD_LAYERS)
        _check_range("n_last_blocks", self.n_last_blocks, 1, self.num_blocks)

    def validate_parameter_count(self):
        """The whole model stays below MAX_PARAMETERS (each size may be fine and the product not)."""
        count = self.approx_num_parameters()
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"this configuration has about {count / 1e9:.1f} billion parameters (backbone and heads), more than "
                f"the {MAX_PARAMETERS / 1e9:.0f} billion allowed (swin-large-w7: about 0.24 billion); "
                "check depths, hidden_sizes, mlp_ratio and the head sizes."
            )

    def validate_rates(self):
        """mlp_ratio, dropout rates and layer_norm_eps in range."""
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO or int(min(self.hidden_sizes) * self.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio must lie in (0, {MAX_MLP_RATIO}] and give every MLP at least one hidden unit, "
                f"got {self.mlp_ratio}."
            )
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise ValueError(f"layer_norm_eps must lie in (0, 1), got {self.layer_norm_eps}.")
        if not self.initializer_range >= 0.0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range}.")

    def validate_swin(self):
        """Swin doubles the width at every patch merging."""
        if self.backbone_type != "swin":
            return
        expected = tuple(self.hidden_sizes[0] * 2**i for i in range(self.num_stages))
        if tuple(self.hidden_sizes) != expected:
            raise ValueError(
                f"Swin doubles its width at every patch merging: hidden_sizes must be {expected}, "
                f"got {tuple(self.hidden_sizes)}."
            )

    def validate_vil(self):
        """Attention types, global tokens and mode; 'full' attention over a bounded number of tokens."""
        if self.backbone_type != "vil":
            return
        bad = [t for t in self.vil_attention_types if t not in VIL_ATTENTION_TYPES]
        if bad:
            raise ValueError(f"vil_attention_types entries must be in {VIL_ATTENTION_TYPES}, got {bad}.")
        if not all(0 <= g <= MAX_VIL_GLOBAL_TOKENS for g in self.vil_num_global_tokens):
            raise ValueError(
                f"vil_num_global_tokens entries must lie in [0, {MAX_VIL_GLOBAL_TOKENS}], got {self.vil_num_global_tokens}."
            )
        if self.vil_mode < 0:
            raise ValueError(f"vil_mode must be >= 0, got {self.vil_mode}.")
        for i, (kind, side) in enumerate(zip(self.vil_attention_types, self.stage_resolutions())):
            if kind == "full" and side * side > MAX_VIL_FULL_ATTENTION_TOKENS:
                raise ValueError(
                    f"ViL stage {i + 1} uses 'full' attention over {side}x{side} tokens at image_size "
                    f"{self.image_size}; its relative-position index would hold {side**4} entries. At most "
                    f"{MAX_VIL_FULL_ATTENTION_TOKENS} tokens: use 'longformer' for that stage or a smaller image_size."
                )

    def validate_cvt(self):
        """CvT-v4: size-preserving depthwise q/k/v convolution, no absolute embeddings, a normed embedding."""
        if self.backbone_type != "cvt":
            return
        k, p = self.cvt_qkv_kernel_size, self.cvt_qkv_padding
        if not 1 <= k <= MAX_CVT_QKV_KERNEL or k % 2 == 0 or p != (k - 1) // 2:
            raise ValueError(
                f"CvT's depthwise q/k/v convolution must keep the map size: cvt_qkv_kernel_size must be odd "
                f"(at most {MAX_CVT_QKV_KERNEL}) and cvt_qkv_padding == (kernel - 1) // 2, got kernel {k}, padding {p}."
            )
        if self.use_absolute_embeddings or not self.patch_norm:
            raise ValueError(
                "CvT-v4 has no absolute position embedding and always normalises its patch embedding: "
                "use_absolute_embeddings must be False and patch_norm True."
            )
        for i, (kernel, stride, padding) in enumerate(zip(self.patch_sizes, self.patch_strides, self.patch_padding)):
            if not 1 <= stride <= kernel or not 0 <= padding < kernel:
                raise ValueError(
                    f"stage {i + 1}: CvT's patch embedding needs 1 <= patch_strides <= patch_sizes and "
                    f"0 <= patch_padding < patch_sizes, got kernel {kernel}, stride {stride}, padding {padding}."
                )

    # --------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EsViTConfig":
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
    # Small images (28-64 px; the image size is an override): three stages with 2-px patches, so a
    # 28-px image still gives 14 x 14 first-stage tokens. The Swin one is the small-image recipes'
    # model; the CvT one adds convolutional embeddings and projections (an inductive bias that
    # helps self-distillation at small budgets).
    "swin-micro-p2": dict(
        backbone_type="swin",
        hidden_sizes=(32, 64, 128),
        depths=(2, 2, 2),
        num_heads=(1, 2, 4),
        patch_sizes=(2, 2, 2),
        window_size=7,
        image_size=28,
        drop_path_rate=0.0,
        layer_norm_eps=1e-6,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        head_out_dim=256,
    ),
    "cvt-micro-p2": dict(
        backbone_type="cvt",
        hidden_sizes=(32, 64, 128),
        depths=(1, 2, 2),
        num_heads=(1, 2, 4),
        patch_sizes=(3, 3, 3),
        patch_strides=(2, 2, 2),
        patch_padding=(1, 1, 1),
        window_size=7,
        image_size=28,
        drop_path_rate=0.0,
        layer_norm_eps=1e-5,
        head_hidden_dim=256,
        head_bottleneck_dim=64,
        head_out_dim=256,
    ),
}

__all__ = ["EsViTConfig", "PRESETS"]
