"""The dataset pipeline: kohya's dataset TOML and folders, buckets, captions, samples, workers.

Plain Python, numpy and PIL (no MindSpore), so it runs in worker processes and tests fast.
Entry points: config.add_dataset_arguments / config.resolve_dataset_configs,
dataset.build_dataset_groups, loader.BatchLoader.
"""
