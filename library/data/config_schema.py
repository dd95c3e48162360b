"""kohya's dataset TOML schema (library/config_util.py ConfigSanitizer): which keys each table
takes and their types, the keys this port refuses with what to do instead, and the resolved
`SubsetConfig` / `DatasetConfig` that library/data/config.py builds from a file and options.
"""

from dataclasses import dataclass, field

from library.data.captions import CaptionOptions

# ---------------------------------------------------------------------------------- schema
# type names: how a value is checked and how the expected type is worded in an error
VALUE_TYPES = {
    "bool": ("a boolean (true or false)", lambda v: isinstance(v, bool)),
    # bool is a subclass of int in Python (and voluptuous accepts `num_repeats = true`); not here
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a float (write 0.0, not 0, as kohya requires)", lambda v: isinstance(v, float)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("a table", lambda v: isinstance(v, dict)),
    "resolution": ("an integer or a list of two integers, e.g. 1024 or [832, 1216]",
                   lambda v: VALUE_TYPES["int"][1](v) or (isinstance(v, list) and len(v) == 2
                                                          and all(VALUE_TYPES["int"][1](x) for x in v))),
    "pair": ("a list of two floats", lambda v: isinstance(v, list) and len(v) == 2
             and all(isinstance(x, float) for x in v)),
}

SUBSET_ASCENDABLE = {
    "color_aug": "bool", "face_crop_aug_range": "pair", "flip_aug": "bool", "num_repeats": "int",
    "random_crop": "bool", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str", "caption_separator": "str", "enable_wildcard": "bool",
    "token_warmup_min": "int", "token_warmup_step": "number", "caption_prefix": "str", "caption_suffix": "str",
    "custom_attributes": "dict", "resize_interpolation": "str",
}
DROPOUT_ASCENDABLE = {
    "caption_dropout_every_n_epochs": "int", "caption_dropout_rate": "number", "caption_tag_dropout_rate": "number",
}
DREAMBOOTH_ASCENDABLE = {"caption_extension": "str", "class_tokens": "str", "cache_info": "bool"}
DREAMBOOTH_SUBSET_ONLY = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool"}
FINETUNE_SUBSET_ONLY = {"metadata_file": "str", "image_dir": "str", "alpha_mask": "bool"}
DATASET_ASCENDABLE = {
    "batch_size": "int", "bucket_no_upscale": "bool", "bucket_reso_steps": "int", "enable_bucket": "bool",
    "max_bucket_reso": "int", "min_bucket_reso": "int", "validation_seed": "int", "validation_split": "float",
    "resolution": "resolution", "network_multiplier": "float", "resize_interpolation": "str",
    # this port's addition: report the real crop offset instead of kohya's (see docs/dataset.md)
    "true_crop_top_left": "bool",
}

GENERAL_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE}
DREAMBOOTH_DATASET_KEYS = {**GENERAL_KEYS, "subsets": "list"}
FINETUNE_DATASET_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE, "subsets": "list"}
DREAMBOOTH_SUBSET_KEYS = {**SUBSET_ASCENDABLE, **DREAMBOOTH_SUBSET_ONLY, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE}
FINETUNE_SUBSET_KEYS = {**SUBSET_ASCENDABLE, **FINETUNE_SUBSET_ONLY, **DROPOUT_ASCENDABLE}
# kohya's ControlNet schema, which --masked_loss turns on for mask-image datasets: every subset of
# such a dataset has conditioning_data_dir (a folder of masks named like the images)
CONTROLNET_ASCENDABLE = {"caption_extension": "str", "cache_info": "bool"}
CONTROLNET_DATASET_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **CONTROLNET_ASCENDABLE, **DROPOUT_ASCENDABLE,
                           "subsets": "list"}
CONTROLNET_SUBSET_KEYS = {**SUBSET_ASCENDABLE, "image_dir": "str", "conditioning_data_dir": "str",
                          **CONTROLNET_ASCENDABLE, **DROPOUT_ASCENDABLE}

# keys kohya accepts that this port does not implement, with what to do instead
UNSUPPORTED_KEYS = {
    "face_crop_aug_range": "face-centred cropping (it only acts with bucketing off) is not implemented; "
                           "remove it and use enable_bucket",
    "cache_info": "the metadata_cache.json image-info cache is not implemented (image sizes are read from "
                  "file headers, which is fast); remove it",
}


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SubsetConfig:
    """One [[datasets.subsets]] table, fully resolved."""

    image_dir: str
    metadata_file: str = None          # set for a fine-tuning subset
    is_reg: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: str = None  # mask images named like the images (with --masked_loss)
    class_tokens: str = None
    caption_extension: str = ".caption"
    num_repeats: int = 1
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    resize_interpolation: str = None
    custom_attributes: dict = field(default_factory=dict, hash=False, compare=False)
    caption: CaptionOptions = CaptionOptions()
    where: str = ""                    # e.g. "datasets[0].subsets[1] of my.toml", for messages

    @property
    def masked(self):
        """Its samples carry a loss mask: the image's alpha channel, or a mask image."""
        return self.alpha_mask or self.conditioning_data_dir is not None


@dataclass(frozen=True)
class DatasetConfig:
    """One [[datasets]] table, fully resolved."""

    subsets: tuple
    is_dreambooth: bool
    resolution: tuple
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str = None
    validation_split: float = 0.0
    validation_seed: int = None
    prior_loss_weight: float = 1.0
    true_crop_top_left: bool = False
    skip_corrupt_images: bool = False
    debug_dataset: bool = False
    where: str = ""
