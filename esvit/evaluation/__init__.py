"""Frozen-feature evaluation of EsViT backbones (Li et al., ICLR 2022, §5; DINO's protocols).

`data` loads labelled splits, `features` extracts pooled or n-last-blocks features across
processes, `knn` is DINO's weighted k-NN vote and `linear_probe` the linear classifiers (the full
augmented protocol and a fast one on cached features). `run_linear_probe.py` drives them;
`visualize` draws crops, attention, region correspondences and a PCA of region features
(`python -m esvit.evaluation.visualize`).
"""
