"""Released checkpoints of the original EsViT code -> `EsViTForPreTraining` / `EsViTModel` folders.

`original` is the command-line converter (`esvit-convert`); `swin`, `vil` and `cvt` each map one
backbone family's original parameter names onto ours as a pure function of the state dict.
"""
