"""The paper's pretrained ImageNet networks (Xception, Inception V3) and the thesis's
VGG-16, from Keras weight files.

    python -m jaxrepro.pretrained import xception xception_weights_tf_dim_ordering_tf_kernels.h5

The architectures are Flax twins of `keras.applications` (`jaxrepro.models.xception`,
`inception_v3`, `vgg16`; registered like the paper's models). `convert` reads a Keras
weight file in a TensorFlow process (`jaxrepro.tfref.applications`), checks every array
against the Flax model, and writes a run directory with one Orbax checkpoint (step 0)
that `jaxrepro.explain`, `jaxrepro.analysis.diff` and the other tools take like a trained
run. jaxrepro never downloads: the weight files are the user's.
"""
