"""Custom kernels of the models: exact fast max-pool gradients, convolutions in the forms
XLA:CPU runs fast (`pooling`, `convolutions`), and the depthwise convolution kernels
jaxrepro builds itself (`depthwise.cc`, built and registered by `native`)."""
