"""Custom kernels of the models: exact fast max-pool gradients and convolutions in the
forms XLA:CPU runs fast (`pooling`, `convolutions`)."""
