"""EsViT models in the transformers style.

EsViT (Li et al., ICLR 2022, arXiv:2106.09785) = a multi-stage vision transformer trained without
labels by DINO's view-level self-distillation plus a region-level matching task. This module holds
what is needed to *use* and *continue training* such a model, and nothing training-only, because
`save_pretrained` copies it (and the single-dot siblings it imports) into every saved folder for
`trust_remote_code` loading:

- `EsViTModel`: backbone -> view feature (`pooler_output`), region features (`last_hidden_state`),
  per-stage hidden states / feature maps, attentions, and the linear-probe feature
  (`get_n_last_blocks_features`).
- `EsViTBackbone`: the same network behind transformers' `AutoBackbone` API (feature maps).
- `EsViTForPreTraining`: backbone + view head + region head (both DINO heads), with the multi-crop
  forward used by pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .backbone_cvt import CvtEncoder
from .backbone_swin import SwinEncoder
from .backbone_vil import VilEncoder
from .configuration_esvit import EsViTConfig
from .heads import DINOHead, WeightNormLinear
from .layers import EncoderOutput

ENCODERS: dict[str, type[nn.Module]] = {"swin": SwinEncoder, "vil": VilEncoder, "cvt": CvtEncoder}


@dataclass
class EsViTModelOutput(ModelOutput):
    """Output of `EsViTModel`.

    Args:
        last_hidden_state: `[B, L, C]` region features: last-stage tokens after the final norm
            (L = 49 at 224 px with the released models).
        pooler_output: `[B, C]` view-level feature (the k-NN feature before L2 normalisation).
        hidden_states: with `output_hidden_states`, the embedding output followed by each stage's
            output, `[B, L_i, C_i]` (before downsampling, without the final norm).
        feature_maps: with `output_hidden_states`, each stage's output reshaped to `[B, C_i, H_i, W_i]`.
        attentions: with `output_attentions`, each block's attention probabilities.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class EsViTPreTrainingOutput(ModelOutput):
    """Output of `EsViTForPreTraining` for a list of crops (the multi-crop forward).

    Args:
        view_logits: `[n_crops * B, K]` view-head outputs, crop-major (rows `c*B:(c+1)*B` are crop c).
        region_logits: one `[B, L_c, K]` tensor per crop: region-head outputs of every region token.
        region_features: one `[B, L_c, C]` tensor per crop: the backbone region features, used to
            match regions between views.
        pooler_output: `[n_crops * B, C]` the pooled backbone features, crop-major.
    """

    view_logits: torch.Tensor | None = None
    region_logits: tuple[torch.Tensor, ...] | None = None
    region_features: tuple[torch.Tensor, ...] | None = None
    pooler_output: torch.Tensor | None = None


class EsViTPreTrainedModel(PreTrainedModel):
    config: EsViTConfig
    config_class = EsViTConfig
    base_model_prefix = "esvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def save_pretrained(self, save_directory, *args, save_image_processor: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus what makes the folder self-contained.

        - `auto_map` names every EsViT class, so `AutoModel`, `AutoBackbone` and
          `AutoModelForPreTraining` all load the folder with `trust_remote_code=True`;
        - `preprocessor_config.json` holds the evaluation transform (see `image_processor_for`), so
          `AutoImageProcessor` and `pipeline("image-feature-extraction")` work on the folder.
        """
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        super().save_pretrained(save_directory, *args, **kwargs)
        if save_image_processor and kwargs.get("is_main_process", True):
            image_processor_for(self.config).save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses weights which do not fit the configuration.

        transformers only reports backbone weights that are missing (initialising them at random),
        unexpected (dropping them) or of another shape; each of these means that config.json and the
        weights disagree (another architecture, or e.g. other `depths`, `patch_norm`, `qkv_bias`),
        and the result would be a silently broken model, so any of them is an error here. Heads
        are exempt both ways: an `EsViTModel` folder loaded as `EsViTForPreTraining` gets new heads,
        and an `EsViTForPreTraining` folder loaded as `EsViTModel` / `EsViTBackbone` drops them.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = _backbone_keys(info.get("missing_keys", ()))
        unexpected = _backbone_keys(info.get("unexpected_keys", ()))
        mismatched = list(info.get("mismatched_keys", ()))
        if missing or unexpected or mismatched:
            raise ValueError(
                f"the checkpoint does not fit this {model.config.backbone_type} EsViT configuration: the config and "
                f"the weights disagree (another architecture, or e.g. other depths, patch_norm or qkv_bias). "
                f"{len(missing)} backbone weights missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(mismatched)} with another shape (e.g. {mismatched[:3]})."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module. Also rebuilds derived (non-persistent) buffers, which come back
        undefined when `from_pretrained` materialises a model built on the meta device."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, WeightNormLinear):
            init.ones_(module.weight_g)
            init.kaiming_uniform_(module.weight_v, a=5**0.5)
        if hasattr(module, "_init_esvit_weights"):
            module._init_esvit_weights(std)


HEAD_PREFIXES = ("head.", "head_dense.")


def _backbone_keys(keys) -> list[str]:
    """The sorted keys of a loading report that belong to the backbone (not to the two heads)."""
    return sorted(k for k in keys if not k.startswith(HEAD_PREFIXES))


AUTO_MAP = {
    "AutoConfig": "configuration_esvit.EsViTConfig",
    "AutoModel": "modeling_esvit.EsViTModel",
    "AutoBackbone": "modeling_esvit.EsViTBackbone",
    "AutoModelForPreTraining": "modeling_esvit.EsViTForPreTraining",
}


def image_processor_for(config: EsViTConfig):
    """The paper's evaluation transform as a stock transformers image processor: resize the shorter
    side to 256/224 of the training size (bicubic), centre-crop to the training size, ImageNet
    mean/std. `BitImageProcessor` does exactly these steps, so no custom processor code is needed."""
    from transformers import BitImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    size = config.image_size
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": round(size * 256 / 224)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def _attn_implementation(config: EsViTConfig, output_attentions: bool) -> str:
    # Attention maps only exist on the eager path; SDPA computes the same function without them.
    if output_attentions:
        return "eager"
    return "eager" if config._attn_implementation == "eager" else "sdpa"


class EsViTModel(EsViTPreTrainedModel):
    """The EsViT backbone: `pixel_values [B, 3, H, W]` -> view and region features.

    Example:
        >>> import esvit, torch
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_config(esvit.EsViTConfig.from_preset("swin-tiny-w7"))
        >>> out = model(torch.randn(1, 3, 224, 224))
        >>> out.pooler_output.shape, out.last_hidden_state.shape
        (torch.Size([1, 768]), torch.Size([1, 49, 768]))
    """

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        self.encoder = ENCODERS[config.backbone_type](config)
        self.post_init()

    def _encode(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_block_features: bool = False,
    ) -> EncoderOutput:
        return self.encoder(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_block_features=output_block_features,
            attn_implementation=_attn_implementation(self.config, output_attentions),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EsViTModelOutput | tuple:
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        enc = self._encode(pixel_values, output_hidden_states, output_attentions)
        hidden_states = feature_maps = None
        if output_hidden_states:
            hidden_states = (enc.embedding_output,) + tuple(enc.stage_outputs)
            feature_maps = tuple(
                x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)  # [B, C_i, H_i, W_i]
                for x, (h, w) in zip(enc.stage_outputs, enc.stage_spatial_shapes)
            )
        output = EsViTModelOutput(
            last_hidden_state=enc.last_hidden_state,
            pooler_output=enc.pooler_output,
            hidden_states=hidden_states,
            feature_maps=feature_maps,
            attentions=enc.attentions if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def get_n_last_blocks_features(self, pixel_values: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """The linear-probe feature of the paper: token-averaged outputs of the last `n` blocks,
        concatenated (`[B, sum of their widths]`; n=4 gives 2304 for Swin-T)."""
        n = self.config.n_last_blocks if n is None else n
        if not 1 <= n <= self.config.num_blocks:
            raise ValueError(f"n must lie in [1, {self.config.num_blocks}], got {n}.")
        enc = self._encode(pixel_values, output_block_features=True)
        return torch.cat(enc.block_features[-n:], dim=-1)


class EsViTBackbone(BackboneMixin, EsViTPreTrainedModel):
    """`AutoBackbone` interface: feature maps `[B, C_i, H_i, W_i]` of the stages in `out_features`
    ("stem" is the patch embedding, "stage<i>" the output of stage i before downsampling)."""

    has_attentions = True

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        self.encoder = ENCODERS[config.backbone_type](config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        enc = self.encoder(
            pixel_values,
            output_hidden_states=True,
            output_attentions=bool(output_attentions),
            attn_implementation=_attn_implementation(self.config, bool(output_attentions)),
        )
        tokens = (enc.embedding_output,) + tuple(enc.stage_outputs)
        stem_hw = _stem_shape(enc.embedding_output, enc.stage_spatial_shapes[0])
        shapes = (stem_hw,) + tuple(enc.stage_spatial_shapes)
        maps = {
            name: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
            for name, x, (h, w) in zip(self.stage_names, tokens, shapes)
        }
        output = BackboneOutput(
            feature_maps=tuple(maps[name] for name in self.out_features),
            hidden_states=tokens if output_hidden_states else None,
            attentions=enc.attentions if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()


def _stem_shape(embedding: torch.Tensor, first_stage_hw: tuple[int, int]) -> tuple[int, int]:
    # The embedding output has the first stage's resolution in every family.
    h, w = first_stage_hw
    if h * w != embedding.shape[1]:
        raise RuntimeError(f"embedding output has {embedding.shape[1]} tokens, expected {h}x{w}.")
    return h, w


class EsViTForPreTraining(EsViTPreTrainedModel):
    """Backbone + view-level head (`head`) + region-level head (`head_dense`), as trained by EsViT.

    `forward` takes one tensor or a list of crops; consecutive crops of the same resolution go
    through the backbone in one call (2 global + N local crops -> 2 backbone calls).
    """

    def __init__(self, config: EsViTConfig):
        super().__init__(config)
        self.esvit = EsViTModel(config)
        head_kwargs = dict(
            in_dim=config.last_hidden_size,
            out_dim=config.head_out_dim,
            use_bn=config.head_use_bn,
            norm_last_layer=config.head_norm_last_layer,
            num_layers=config.head_num_layers,
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
        )
        self.head = DINOHead(**head_kwargs)
        self.head_dense = DINOHead(**head_kwargs)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor | list[torch.Tensor], compute_region: bool = True, **kwargs
    ) -> EsViTPreTrainingOutput:
        """`compute_region=False` skips the region head (DINO's view-only training needs none):
        `region_logits` is then None."""
        crops = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        if not crops:
            raise ValueError("EsViTForPreTraining needs at least one crop.")
        pooled, regions = [], []
        for group in _group_by_resolution(crops):
            out = self.esvit(torch.cat(group), return_dict=True)  # one backbone call per resolution
            pooled.append(out.pooler_output)  # [G*B, C]
            regions.extend(out.last_hidden_state.chunk(len(group)))  # G x [B, L, C]
        pooled = torch.cat(pooled)  # [n_crops*B, C]
        if not compute_region:
            return EsViTPreTrainingOutput(
                view_logits=self.head(pooled), region_logits=None, region_features=tuple(regions), pooler_output=pooled
            )
        # One head call over every region row of every crop keeps BatchNorm heads' statistics equal
        # to the original's (it, too, runs head_dense once on the concatenated rows).
        rows = torch.cat([r.flatten(0, 1) for r in regions])  # [sum_c B*L_c, C]
        dense = self.head_dense(rows).split([r.shape[0] * r.shape[1] for r in regions])
        return EsViTPreTrainingOutput(
            view_logits=self.head(pooled),
            region_logits=tuple(d.view(r.shape[0], r.shape[1], -1) for d, r in zip(dense, regions)),
            region_features=tuple(regions),
            pooler_output=pooled,
        )


def _group_by_resolution(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a crop list into runs of consecutive crops with the same spatial size."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


EsViTConfig.register_for_auto_class()
EsViTModel.register_for_auto_class("AutoModel")
EsViTBackbone.register_for_auto_class("AutoBackbone")
EsViTForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "image_processor_for",
    "EsViTPreTrainedModel",
    "EsViTModel",
    "EsViTBackbone",
    "EsViTForPreTraining",
    "EsViTModelOutput",
    "EsViTPreTrainingOutput",
]
