"""TensorFlow/Keras reference runs, kept out of the JAX process (issue 5).

Two sides, two processes, one file format between them:

- TF side (imports TensorFlow; run as `python -m jaxrepro.tfref ...`, never imported
  by the JAX code): `models` (the Keras models of Listings 3 and 6), `runtime` (the
  determinism recipe of seeds/000 and seeds/001), `__main__` (the CLI),
  `determinism` (TF's own rerun check).
- Neutral (NumPy only, safe on both sides): `weights` (the `.npz` file of Flax-named
  arrays), `transfer` (Flax <-> Keras names and layouts) and `process` (a TF child's
  environment; `JAXREPRO_SIDE=tensorflow` keeps JAX and its XLA flags out of it).
- JAX side: `export` (a run or checkpoint, or Flax variables, to the weights file).

This package's `__init__` imports nothing, so `import jaxrepro.tfref.weights` in the
JAX process does not pull in TensorFlow.
"""
