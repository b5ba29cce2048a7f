"""The benchmark and demo harness: code that measures or shows the engine, never imported by it.

* :mod:`streamgru.harness.bench`: ``streamgru bench``, the engine against onnxruntime and
  PyTorch (workloads, the user-side state store of the baselines, contenders, tables, plots);
* :mod:`streamgru.harness.demo`: ``streamgru demo``, simulated smart watches through one engine
  (the default model and its held-out data are package data in ``streamgru/data``);
* :mod:`streamgru.harness.cluster_bench`: ``streamgru bench --cluster``, a Zipf event stream
  through local Engines and ``ShardedEngine`` shards.

The runtime (``streamgru``'s model, kernels, packing, state, engine, formats, pipeline, metrics
and cluster modules) imports nothing from here; ``tests/test_harness.py`` checks it.
"""
