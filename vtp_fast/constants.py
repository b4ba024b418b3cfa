"""Numbers that are part of the published model's contract, shared by layers that must not import each other.

The input normalisation is applied by data loading (decoders, views), by the model (`VTP.normalize`) and by the
perceptual loss (LPIPS re-normalisation); it lives here, below all three, so none of them imports another.
"""

# the published VTP checkpoints' input normalisation (RGB in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
