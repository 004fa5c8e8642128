"""The plumbing behind train.py, sample.py, compare.py and bench.py, one job per file. A learner can skip it:
the method is in ddl_gpt.py and the training loop in train.py."""
