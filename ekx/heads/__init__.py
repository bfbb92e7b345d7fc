"""Stage 2: temporal heads on cached features.

- `models/`  the head registry (`create`, `register`, `REGISTRY`) and the heads themselves;
- `config`   TrainConfig, the hyperparameters (torch-free: the CLI builds its flags from it);
- `data`     cache -> tensors, batches by indexing;  `train` the loop (`fit`, `main`);
- `checkpoint`, `runlog`   run files;  `metrics`, `evaluate`   the official metrics and submissions;
- `sweep`, `compare`       many runs and their comparison.

Importing this package imports nothing heavy; import the module you need.
"""
