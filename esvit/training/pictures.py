"""Pictures of the teacher in TensorBoard during pretraining.

At the start and at every evaluation step, `log_pictures` draws the figures of
`esvit.evaluation.visualize` (multi-crop views, last-stage attention, region matching between the
two global views, PCA of the region features) for a few fixed training images and adds them to
the TensorBoard tracker as `pictures/<figure>/<i>`. The augmentation seed is fixed, so the same
crops come back at every step and the pictures show how the teacher changes.

It runs on the main process only, does nothing unless TensorBoard is one of the trackers, touches
no random state of the run (the crops use a private generator, the model runs under `no_grad` in
eval mode and is put back into train mode), and a failure to draw is a warning, never the end of
a training run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..images import DEFAULT_MAX_IMAGE_PIXELS, UndecodableImage, decode_image, read_image_bytes

logger = logging.getLogger(__name__)

#: TensorBoard tag prefix of the pictures.
TAG_PREFIX = "pictures"


def pick_pictures(dataset, num_images: int = 2, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list:
    """The first `num_images` decodable images of a pretraining dataset (map-style or streamed,
    rows `{"image": undecoded}` as `load_pretraining_images` returns them), as PIL images."""
    images = []
    for example in dataset:
        try:
            images.append(decode_image(read_image_bytes(example["image"]), max_pixels=max_pixels))
        except UndecodableImage:
            continue
        if len(images) >= num_images:
            break
    return images


def has_tensorboard(accelerator) -> bool:
    return any(getattr(tracker, "name", None) == "tensorboard" for tracker in accelerator.trackers)


def log_pictures(
    accelerator,
    model,
    images: Sequence,
    augmentation,
    step: int,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> bool:
    """Add the figures of `images` to TensorBoard at `step`; True when something was logged.

    Args:
        accelerator: the run's `Accelerator` (after `init_trackers`).
        model: the teacher (`EsViTForPreTraining` or its `EsViTModel`), not wrapped by DDP.
        images: PIL images, e.g. from `pick_pictures`.
        augmentation: the run's `MultiCropAugmentation`.
        step: the global optimizer step.
    """
    if not images or not accelerator.is_main_process or not has_tensorboard(accelerator):
        return False
    from ..evaluation.visualize import FIGURE_KINDS, render_figures

    try:
        figures = render_figures(model, images, augmentation, kinds=kinds or FIGURE_KINDS, seed=seed)
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, array in figures.items():
            writer.add_image(f"{TAG_PREFIX}/{tag}", array, global_step=step, dataformats="HWC")
        writer.flush()
    except Exception as err:  # a picture is never worth a training run
        logger.warning("could not log pictures at step %d: %s: %s", step, type(err).__name__, err)
        return False
    return True


__all__ = ["TAG_PREFIX", "has_tensorboard", "log_pictures", "pick_pictures"]
