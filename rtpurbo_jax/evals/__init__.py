"""Evaluation helpers in the library: RULER-style task generators (`tasks`) and batched greedy / teacher-forced
decoding through the serving API with needle accuracy (`decoding`). `benchmarks.accuracy` and
`train.distill` both use them."""
