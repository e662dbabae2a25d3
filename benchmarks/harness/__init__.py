"""The benchmark harness the studies build on, one job per module.

* :mod:`~benchmarks.harness.fit`: the Trainer, the data order, one timed and seeded fit;
* :mod:`~benchmarks.harness.measure`: accuracy, sparsity, compression and per-layer non-zeros of a trained net;
* :mod:`~benchmarks.harness.methods`: the callbacks (or modules) that make each method: DWF, ModelPruning, PAT,
  one-shot magnitude pruning, dense;
* :mod:`~benchmarks.harness.store`: the resumable JSONL result store (config keys, rows, retiring old rows);
* :mod:`~benchmarks.harness.runs`: train and measure configs, appending one row each and skipping those done;
* :mod:`~benchmarks.harness.tables` and :mod:`~benchmarks.harness.plots`: grouping over seeds, formatting, figures.

The networks and the LightningModule that trains them are in :mod:`benchmarks.models`.
"""
