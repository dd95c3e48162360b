"""The dataset pipeline: kohya's dataset TOML and folders, buckets, captions, examples, workers.

Plain Python, numpy and PIL (no MindSpore; tests/test_layering.py keeps it so), so it runs in
worker processes and tests fast:

    config_schema.py  kohya's TOML keys and types; the resolved SubsetConfig / DatasetConfig
    config.py         the dataset options, the TOML file and the legacy forms -> DatasetConfigs
    captions.py       caption files and kohya's caption processing (shuffle, dropout, wildcards)
    images.py         image files, resizing and cropping, colour augmentation
    buckets.py        aspect-ratio buckets and SDXL's size conditioning (crop_top_left)
    bucket_cap.py     --max_bucket_count: fewer buckets, fewer compiles
    dataset.py        DatasetGroup: records, buckets, regularisation balance, epoch batch order
    examples.py       one example, as kohya's __getitem__ makes it
    loader.py         BatchLoader: batches, worker processes, data-parallel shards, resume position
    cache/            latent and text-encoder output caches (keys, npz files, rank exchange)
    dataset_metadata.py, fingerprint.py   the dataset's ss_* keys; what a --resume checks

Entry points: config.add_dataset_arguments / config.resolve_dataset_configs,
dataset.build_dataset_groups, loader.BatchLoader.
"""
