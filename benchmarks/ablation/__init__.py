"""A controlled CPU ablation of MoTE: six arms, a synthetic task whose stages
conflict, the real ``axolotl train``; see docs/ablation.md.

Run ``python -m benchmarks.ablation``."""
