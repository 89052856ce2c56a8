"""Self-supervised pretraining of foundation encoders: ``splitfl pretrain --config FILE --out DIR``.

An encoder is pretrained without labels (MAE for Vision Transformers, SimCLR
for CNNs and other timm models with pooled features) on images from one or
several sources, and written as ``DIR/encoder.pt`` in the timm model's own key
names, which every splitfl regime then loads with ``model.pretrained``.

Modules: :mod:`.config` (the typed configuration), :mod:`.sources` (images
only, never labels), :mod:`.mae`, :mod:`.simclr` (the two objectives),
:mod:`.augment` (batched, seeded SimCLR views), :mod:`.outputs` (encoder.pt,
the loss curve), :mod:`.runner` (the Fabric loop, resume, pretrain.json).
This package file stays light (no torch import) so that ``splitfl --help``
stays fast.
"""
