"""Tools that compare and measure runs, each a module with its own command line.

`diff` (two runs or checkpoints: the first divergent step and layer), `variants` (one
experiment under several CPU code paths, core counts or emulated CPUs, diffed),
`matched` and `compare` (the same weights and batches in JAX and Keras), `variance`
(seed against framework against code path against rerun), `bench` and its JAX half
`bench_jax` (speed next to TensorFlow), `export` (a run's weights for the TF side).
"""
