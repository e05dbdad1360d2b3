"""TensorFlow/Keras reference runs, kept out of the JAX process.

Two sides, two processes, one file format between them:

- TF side (imports TensorFlow; run as `python -m jaxrepro.tfref ...`, never imported
  by the JAX code): `models` (the Keras models of Listings 3 and 6), `runtime` (the
  paper's determinism recipe), `cli` (the command line), `matched` (the Keras half of
  the matched protocol), `train` (the paper's Keras training), `bench` (the Keras half
  of the benchmark), `determinism` and `rerun` (TF's own rerun check).
- Neutral (NumPy only, safe on both sides): `weights` (the `.npz` file of Flax-named
  arrays), `transfer` (Flax <-> Keras names and layouts) and `process` (a TF child's
  environment; `JAXREPRO_SIDE=tensorflow` keeps JAX and its XLA flags out of it).

The JAX side writes and reads the weight file (`jaxrepro.analysis.export`,
`jaxrepro.analysis.matched`). The TF side imports only jaxrepro's core, its data
pipeline and this package; this `__init__` imports nothing, so
`import jaxrepro.tfref.weights` in the JAX process does not pull in TensorFlow.
"""
