"""What a pretraining run reports while it trains.

* `MetricWindow`: sums of the per-micro-batch metrics between two log points, kept on the device
  and reduced over processes only when logged (no host sync per step).
* `CollapseMonitor`: a warning when the teacher's view entropy stays near 0 (every image on one
  prototype) or near log K (uniform outputs): DINO's two collapse modes (Caron et al. 2021, §5.3).
* `KnnMonitor`: weighted k-NN top-1 (DINO's protocol, `evaluation.knn`) of the teacher's pooled
  feature on a small labelled split, before training (the random-weights baseline) and every
  `eval_steps` steps: the number that shows within minutes whether a run learns or collapses.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from .pretrainer import StepOutput

logger = logging.getLogger(__name__)

# Teacher view entropy (fraction of log K) outside which the run is reported as collapsing.
COLLAPSE_LOW, COLLAPSE_HIGH = 0.02, 0.98


class MetricWindow:
    """Means of the step metrics over the micro-batches since the last `reduce`, over all processes."""

    NAMES = ("loss", "view_loss", "region_loss", "koleo_loss", "teacher_entropy", "teacher_region_entropy")

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # + finite micro-batches, images, skipped images, skipped (non-finite) optimizer steps
        self.sums = torch.zeros(len(self.NAMES) + 4, device=self.device)

    def add(self, out: StepOutput, num_skipped_images: int) -> None:
        zero = torch.zeros((), device=self.device)
        values = torch.stack(
            [
                (v if v is not None else zero).float()
                for v in (
                    out.loss,
                    out.view_loss,
                    out.region_loss,
                    out.koleo_loss,
                    out.teacher_entropy,
                    out.teacher_region_entropy,
                )
            ]
        )
        finite = torch.isfinite(values).all()
        # a non-finite micro-batch is left out of the means (its step is skipped and counted)
        self.sums[: len(self.NAMES)] += torch.where(finite, values, zero)
        extra = torch.stack([finite.float(), zero + out.num_images, zero + num_skipped_images, zero + out.skipped])
        self.sums[len(self.NAMES) :] += extra

    def add_skipped(self, num_skipped_images: int) -> None:
        """Count the images of a batch that was dropped whole (none of its images decoded)."""
        self.sums[len(self.NAMES) + 2] += num_skipped_images

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over processes and micro-batches, plus `images`, `skipped_images`, `nonfinite_steps`."""
        total = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        n = len(self.NAMES)
        count = max(total[n], 1.0)
        means = {name: total[i] / count for i, name in enumerate(self.NAMES)}
        # every process skips the same steps (the decision follows all-reduced gradients)
        means.update(
            images=int(total[n + 1]),
            skipped_images=int(total[n + 2]),
            nonfinite_steps=int(round(total[n + 3] / accelerator.num_processes)),
        )
        self.reset()
        return means


class CollapseMonitor:
    """Warn when the teacher's view entropy stays near 0 or near log K for `patience_steps`."""

    def __init__(self, out_dim: int, patience_steps: int):
        self.log_k = math.log(out_dim)
        self.patience = patience_steps
        self.run_steps = 0
        self.warned = False
        self.last_step = 0

    def update(self, entropy: float, steps: int | None, global_step: int) -> None:
        """`steps`: optimizer steps the entropy stands for (None: those since the last update)."""
        steps = global_step - self.last_step if steps is None else steps
        self.last_step = global_step
        if self.patience <= 0:
            return
        fraction = entropy / self.log_k
        if COLLAPSE_LOW < fraction < COLLAPSE_HIGH:
            self.run_steps, self.warned = 0, False
            return
        self.run_steps += steps
        if self.run_steps >= self.patience and not self.warned:
            mode = "near 0" if fraction <= COLLAPSE_LOW else "near log K"
            logger.warning(
                f"Possible collapse at step {global_step}: the teacher entropy has been {mode} "
                f"({entropy:.3f} of log K = {self.log_k:.3f}) for {self.run_steps} steps. Consider "
                "--teacher_normalization sinkhorn_knopp, a lower teacher temperature, a higher centre "
                "momentum, or a lower learning rate; the k-NN monitor (--eval_dataset_name) tells whether "
                "the features still improve."
            )
            self.warned = True


class KnnMonitor:
    """k-NN top-1 of the teacher's pooled feature on a fixed labelled split.

    The split's images are decoded and preprocessed once (resize + centre crop to the model's
    image size, ImageNet normalisation) and kept as float16 on the CPU; a bank part (features with
    labels) and a query part come from the data's own train / test splits when it has both; with
    one split, every image (up to `2 * max_samples`, a stratified sample) is a query that votes
    among all the others (leave-one-out), which gives five times the queries of an 80 / 20 split.
    Only the main process computes; the others wait, so a monitor must stay small (`max_samples`
    images per part).

    Args:
        name_or_path: what `evaluation.data.load_labelled_split` reads (Hub id, class folders, ...).
        image_size: the model's input size.
        max_samples: images per part at most.
        label_column: the label column (guessed when None).
        k: neighbours of the vote (20, as DINO reports for small sets), T = 0.07.
    """

    def __init__(
        self,
        name_or_path: str,
        image_size: int,
        max_samples: int = 2000,
        label_column: str | None = None,
        k: int = 20,
        seed: int = 0,
    ):
        from ..evaluation.data import build_eval_transform, load_labelled_split
        from ..evaluation.linear_probe import stratified_holdout
        from ..images import to_rgb

        train = load_labelled_split(name_or_path, "train", label_column=label_column)
        transform = build_eval_transform(image_size)

        def pixels(split, rows) -> tuple[torch.Tensor, torch.Tensor]:
            images = [transform(to_rgb(split.dataset[int(i)][split.image_column])) for i in rows]
            labels = torch.tensor([int(split.dataset[int(i)][split.label_column]) for i in rows])
            return torch.stack(images).half(), labels  # [N, 3, S, S], [N]

        try:
            test = load_labelled_split(
                name_or_path, ("validation", "val", "test"), label_column=label_column, class_names=train.class_names
            )
        except ValueError:
            test = None
        if test is not None:
            bank_rows = range(min(max_samples, len(train)))
            query_rows = range(min(max_samples, len(test)))
            self.bank = pixels(train, bank_rows)
            self.query = pixels(test, query_rows)
            self.description = f"train / {test.name} splits"
        else:
            labels = torch.tensor(train.dataset[train.label_column])
            rows = torch.arange(len(labels))
            if len(rows) > 2 * max_samples:  # a stratified sample of the allowed size
                rows = stratified_holdout(labels, 2 * max_samples / len(rows), seed=seed)[1]
            self.bank = self.query = pixels(train, rows.tolist())
            self.description = f"leave-one-out over {len(rows)} images of its one split"
        self.num_classes = train.num_classes
        self.leave_one_out = self.query is self.bank
        self.k = min(k, self.bank[0].shape[0] - int(self.leave_one_out))
        self.history: list[tuple[int, float]] = []
        logger.info(
            "k-NN monitor: %d bank and %d query images of %s (%s), %d classes.",
            self.bank[0].shape[0],
            self.query[0].shape[0],
            name_or_path,
            self.description,
            self.num_classes,
        )

    @torch.no_grad()
    def _features(self, backbone, pixels: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
        dtype = next(backbone.parameters()).dtype
        out = [
            backbone(pixel_values=pixels[i : i + batch_size].to(device, dtype)).pooler_output.float().cpu()
            for i in range(0, pixels.shape[0], batch_size)
        ]
        return torch.cat(out)  # [N, C]

    def evaluate(self, backbone, accelerator, step: int) -> float | None:
        """k-NN top-1 (percent) of `backbone` (an `EsViTModel`) on the main process; None elsewhere.

        The backbone is put in eval mode for the measurement and given back in its former mode.
        """
        from ..evaluation.knn import knn_classify

        top1 = None
        if accelerator.is_main_process:
            start = time.perf_counter()
            was_training = backbone.training
            backbone.eval()
            try:
                bank = self._features(backbone, self.bank[0], accelerator.device)
                query = bank if self.leave_one_out else self._features(backbone, self.query[0], accelerator.device)
            finally:
                backbone.train(was_training)
            result = knn_classify(bank, self.bank[1], query, self.query[1], self.num_classes, ks=(self.k,),
                                  leave_one_out=self.leave_one_out)  # fmt: skip
            top1 = result[self.k]["top1"]
            self.history.append((step, top1))
            logger.info(
                "k-NN monitor at step %d: top-1 %.2f%% (k=%d, %.1f s).", step, top1, self.k, time.perf_counter() - start
            )
        accelerator.wait_for_everyone()
        return top1

    def summary(self) -> dict:
        """`{initial, final, best, best_step, history}` of the measurements so far (main process)."""
        if not self.history:
            return {}
        best_step, best = max(self.history, key=lambda item: item[1])
        return {
            "knn_top1_initial": self.history[0][1],
            "knn_top1_final": self.history[-1][1],
            "knn_top1_best": best,
            "knn_best_step": best_step,
            "knn_k": self.k,
            "knn_history": [list(item) for item in self.history],
            "knn_data": self.description,
        }


__all__ = ["COLLAPSE_HIGH", "COLLAPSE_LOW", "CollapseMonitor", "KnnMonitor", "MetricWindow"]
