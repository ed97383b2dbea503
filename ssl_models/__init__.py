"""Pure-PyTorch self-supervised learning: backbones, heads, objectives, diagnostics.

Every objective is an energy-based model E(x, y) (low for compatible view pairs)
paired with the mechanism that keeps it from collapsing. Nothing here imports Ray.
"""
