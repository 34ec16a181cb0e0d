"""The paper's training binaries (`python -m train.lm`, `train.nmt`, `train.score`,
`train.translate`) and what they are made of:

- `train.data`: the `--data` sources and their tf.data pipelines, the subword tokenizer,
  and the built-in corpus (`train/data/bible`) with its builder;
- `train.training`: the shared flags, the set-up they drive, the training loop, the loss,
  the learning-rate schedule and the run records;
- `train.distribution`: where the loop runs (one device, data parallel, DTensor);
- `train.serving`: the SavedModels the binaries export and reading back a finished run.
"""
