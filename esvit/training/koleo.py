"""KoLeo regulariser: spread the features of a batch uniformly over the sphere.

Sablayrolles et al., "Spreading vectors for similarity search" (ICLR 2019), derived from the
Kozachenko-Leonenko differential-entropy estimator; DINOv2 (Oquab et al., 2023, sec. 4) adds it
with weight 0.1 to the student's class tokens of each global crop. For L2-normalised features
`x_1..x_n` with nearest neighbours `x_j(i)` (within the batch, excluding `i`),

    L_koleo = -1/n * sum_i log(||x_i - x_j(i)|| + eps),

which is large when two features nearly coincide: it pushes collapsed features apart, the failure
seen when a DINO-family objective trains a small model on little data. EsViT itself has no such
term; `--koleo_loss_weight 0` (the default) leaves the objective exactly the original's.

The neighbours are searched within each process's micro-batch, as DINOv2 does per GPU: unlike the
DINO / EsViT loss, the term depends on how the global batch is split, so runs with KoLeo on give
slightly different results on 1 and 2 processes or with gradient accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of one batch of features `[n, C]`; a scalar, float32. A batch of one feature has
    no neighbour and gives 0 (e.g. a micro-batch left with one decodable image)."""
    if features.shape[0] < 2:
        return features.float().sum() * 0.0  # keeps the graph, so backward still reaches every parameter
    x = F.normalize(features.float(), dim=-1, eps=eps)  # [n, C]
    with torch.no_grad():  # the neighbour choice is a selection: no gradient flows through it
        similarity = x @ x.T  # [n, n]
        similarity.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
        neighbour = similarity.argmax(dim=1)  # [n]
    distances = (x - x[neighbour]).norm(dim=-1)  # [n]
    return -torch.log(distances + eps).mean()


def koleo_per_crop(pooled: torch.Tensor, num_crops: int) -> torch.Tensor:
    """Sum over crops of the KoLeo loss of each crop's batch: `pooled` is `[num_crops * B, C]`,
    crop-major (as `EsViTPreTrainingOutput.pooler_output`); DINOv2's per-global-crop form."""
    return sum(koleo_loss(chunk) for chunk in pooled.chunk(num_crops))


__all__ = ["koleo_loss", "koleo_per_crop"]
