"""InternVL (3 / 3.5, transformers' internvl): InternViT with pixel shuffle and MLP projector, 448-pixel tiles plus
a thumbnail, 1-D positions, video frames as labelled images."""

from mmserve.models.internvl.family import InternVL, from_pretrained  # noqa: F401
