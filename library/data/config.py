"""Dataset configuration: kohya's dataset TOML, its command-line options and its legacy forms.

`add_dataset_arguments` adds kohya's dataset options (same names, same defaults) to a parser;
`resolve_dataset_configs` turns the parsed namespace (plus `--dataset_config`, or the legacy
`--train_data_dir`/`--reg_data_dir`/`--in_json`) into validated `DatasetConfig`s. Precedence is
kohya's: subset > dataset > [general] > command line > default, first value that is set wins.

The schema is kohya's (library/config_util.py ConfigSanitizer) with one addition,
`true_crop_top_left`, and stricter checks: an unknown key, a wrong type, a key kohya accepts but
this port does not implement, or an out-of-range value is a UserError that names the key, the
table (e.g. `datasets[0].subsets[1]`) and the file.
"""

import argparse
import difflib
import json
import logging
import os

import toml

from library.data.captions import CaptionOptions
from library.data.config_schema import (CONTROLNET_DATASET_KEYS, CONTROLNET_SUBSET_KEYS,
                                         DREAMBOOTH_DATASET_KEYS, DREAMBOOTH_SUBSET_KEYS,
                                         FINETUNE_DATASET_KEYS, FINETUNE_SUBSET_KEYS, GENERAL_KEYS,
                                         UNSUPPORTED_KEYS, VALUE_TYPES, DatasetConfig, SubsetConfig)
from library.data.images import RESIZE_INTERPOLATIONS
from library.errors import UserError, read_utf8

logger = logging.getLogger(__name__)

# kohya's argparse names that map to a different config key
_ARG_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


# ---------------------------------------------------------------------------------- CLI
def add_dataset_arguments(parser):
    """Add kohya's dataset options (train_util.add_dataset_arguments and the dataset-related
    training options) with kohya's names and defaults, plus this port's two additions. The
    trainer builds its parser with this, so it must not define these names itself."""
    a = parser.add_argument
    a("--dataset_config", type=str, default=None, help="dataset TOML or JSON (kohya's format)")
    a("--train_data_dir", type=str, default=None, help="parent of `N_class` image folders (legacy form)")
    a("--reg_data_dir", type=str, default=None, help="parent of `N_class` regularisation folders (legacy form)")
    a("--in_json", type=str, default=None, help="fine-tuning metadata JSON for --train_data_dir (legacy form)")
    a("--dataset_repeats", type=int, default=1, help="num_repeats for --in_json")
    a("--resolution", type=str, default=None, help="'size' or 'width,height'; buckets keep this area")
    a("--train_batch_size", type=int, default=1)
    a("--enable_bucket", action="store_true", help="aspect-ratio bucketing (set it for SDXL)")
    a("--min_bucket_reso", type=int, default=256)
    a("--max_bucket_reso", type=int, default=1024, help="kohya's default 1024 loses area at 1024^2; use 2048")
    a("--bucket_reso_steps", type=int, default=64, help="bucket side granularity; a multiple of 32 for SDXL")
    a("--bucket_no_upscale", action="store_true")
    a("--resize_interpolation", type=str, default=None, choices=RESIZE_INTERPOLATIONS)
    a("--caption_extension", type=str, default=".caption", help="kohya's default is .caption, not .txt")
    a("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # kohya's misspelled alias
    a("--cache_info", action="store_true", help="not supported (an error)")
    a("--shuffle_caption", action="store_true")
    a("--caption_separator", type=str, default=",")
    a("--keep_tokens", type=int, default=0)
    a("--keep_tokens_separator", type=str, default="")
    a("--secondary_separator", type=str, default=None)
    a("--enable_wildcard", action="store_true")
    a("--caption_prefix", type=str, default=None)
    a("--caption_suffix", type=str, default=None)
    a("--caption_dropout_rate", type=float, default=0.0)
    a("--caption_dropout_every_n_epochs", type=int, default=0)
    a("--caption_tag_dropout_rate", type=float, default=0.0)
    a("--token_warmup_min", type=int, default=1)
    a("--token_warmup_step", type=float, default=0)
    a("--color_aug", action="store_true")
    a("--flip_aug", action="store_true")
    a("--random_crop", action="store_true")
    a("--face_crop_aug_range", type=str, default=None, help="not supported (an error)")
    a("--alpha_mask", action="store_true", help="use the image alpha channel as a loss mask")
    a("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    a("--debug_dataset", action="store_true")
    a("--max_data_loader_n_workers", type=int, default=8, help="image-decoding worker processes (0: in-process)")
    a("--persistent_data_loader_workers", action="store_true")
    a("--validation_split", type=float, default=0.0)
    a("--validation_seed", type=int, default=None)
    a("--true_crop_top_left", action="store_true",
      help="condition SDXL on the real crop offset instead of kohya's (issue #1443) value")
    a("--skip_corrupt_images", action="store_true",
      help="leave out images whose header cannot be read (they are counted and reported) instead of stopping")


def _parse_resolution_arg(value):
    try:
        parts = tuple(int(p) for p in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"--resolution {value!r}: expected 'size' or 'width,height' with positive integers")
    return parts


def _args_as_config(args):
    """The namespace as a config-like dict (kohya's argparse fallback level)."""
    values = {}
    for name, value in vars(args).items():
        values[_ARG_TO_KEY.get(name, name)] = value
    if args.caption_extention is not None:
        values["caption_extension"] = args.caption_extention
    if args.resolution is not None:
        values["resolution"] = _parse_resolution_arg(args.resolution)
    values["cache_info"] = args.cache_info or None
    return values


# ---------------------------------------------------------------------------------- loading
def load_config_file(path):
    """Read a kohya dataset config (.toml or .json by suffix, like kohya)."""
    if not os.path.isfile(path):
        raise UserError(f"dataset config {path} not found")
    lower = path.lower()
    try:
        if lower.endswith(".toml"):
            return toml.loads(read_utf8(path, "dataset config"))
        if lower.endswith(".json"):
            return json.loads(read_utf8(path, "dataset config"))
    except (toml.TomlDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"dataset config {path} is not valid {'TOML' if lower.endswith('.toml') else 'JSON'}: {e}") from None
    raise UserError(f"dataset config {path}: unsupported format; use a .toml or .json file")


def _check_table(table, allowed, where, problems):
    """Append to `problems` one message per bad key or value of `table`."""
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table")
        return
    for key, value in table.items():
        if key in UNSUPPORTED_KEYS and key in allowed:
            problems.append(f"{where}: `{key}` is a kohya key this port does not support: {UNSUPPORTED_KEYS[key]}")
            continue
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            problems.append(f"{where}: unknown key `{key}`.{hint} Allowed keys here: {', '.join(sorted(allowed))}")
            continue
        kind = allowed[key]
        if kind == "list":
            continue
        description, ok = VALUE_TYPES[kind]
        if not ok(value):
            problems.append(f"{where}: `{key}` = {value!r} has the wrong type; expected {description}")


class ConfigProblems(UserError):
    """Several problems of one file, one line each (`problems` holds them)."""

    def __init__(self, problems, source):
        self.problems = list(problems)
        text = problems[0] if len(problems) == 1 else \
            f"{len(problems)} problems in {source}:\n  " + "\n  ".join(problems)
        super().__init__(text)


def _raise_problems(problems, source):
    """One UserError for all of a file's problems (a user fixes them in one run, not one per run)."""
    if problems:
        raise ConfigProblems(problems, source)


def _collect(problems, error):
    problems.extend(getattr(error, "problems", [str(error)]))


def validate_user_config(config, source, masked_loss=False):
    """Check a loaded config dict against kohya's schema; `source` names the file in messages.
    Every problem of the file is reported at once. `masked_loss` (--masked_loss) allows mask-image
    datasets, as in kohya."""
    problems = []
    _check_table(config, {"general": "list", "datasets": "list"}, f"top level of {source}", problems)
    general = config.get("general", {})
    _check_table(general, GENERAL_KEYS, f"[general] of {source}", problems)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        problems.append(f"{source}: no [[datasets]] table; add at least one with a [[datasets.subsets]]")
        datasets = []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}] of {source}"
        if not isinstance(ds, dict):
            problems.append(f"{where}: expected a table")
            continue
        subsets = ds.get("subsets", [])
        if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
            problems.append(f"{where}: needs at least one [[datasets.subsets]] table")
            continue
        with_masks = [("conditioning_data_dir" in s) for s in subsets]
        if any(with_masks):
            if not masked_loss:
                problems.append(f"{where}: `conditioning_data_dir` (mask images) needs --masked_loss, as in kohya")
            elif not all(with_masks):
                problems.append(f"{where}: with mask images (conditioning_data_dir) in one subset, every subset of "
                                f"the dataset needs them (kohya's mask datasets); put the others in another "
                                f"[[datasets]]")
            else:
                _check_table(ds, CONTROLNET_DATASET_KEYS, where, problems)
                for j, sub in enumerate(subsets):
                    swhere = f"datasets[{i}].subsets[{j}] of {source}"
                    _check_table(sub, CONTROLNET_SUBSET_KEYS, swhere, problems)
                    if "image_dir" not in sub:
                        problems.append(f"{swhere}: `image_dir` is required")
            continue
        with_meta = [("metadata_file" in s) for s in subsets]
        if any(with_meta) and not all(with_meta):
            problems.append(f"{where}: DreamBooth subsets (image_dir only) and fine-tuning subsets (metadata_file) "
                            f"cannot be mixed in one dataset; put them in separate [[datasets]]")
            continue
        finetune = all(with_meta)
        _check_table(ds, FINETUNE_DATASET_KEYS if finetune else DREAMBOOTH_DATASET_KEYS, where, problems)
        for j, sub in enumerate(subsets):
            swhere = f"datasets[{i}].subsets[{j}] of {source}"
            _check_table(sub, FINETUNE_SUBSET_KEYS if finetune else DREAMBOOTH_SUBSET_KEYS, swhere, problems)
            required = "metadata_file" if finetune else "image_dir"
            if required not in sub:
                problems.append(f"{swhere}: `{required}` is required")
    _raise_problems(problems, source)


# ---------------------------------------------------------------------------------- resolving
def _lookup(key, levels, default=None):
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return default


def _check_range(where, name, value, lo=None, hi=None):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise UserError(f"{where}: `{name}` = {value!r} must be {bounds}")


def _resolve_subset(levels, finetune, where):
    def get(key, default=None):
        return _lookup(key, levels, default)

    caption = CaptionOptions(
        shuffle_caption=get("shuffle_caption", False), caption_separator=get("caption_separator", ","),
        keep_tokens=get("keep_tokens", 0), keep_tokens_separator=get("keep_tokens_separator", ""),
        secondary_separator=get("secondary_separator"), enable_wildcard=get("enable_wildcard", False),
        caption_prefix=get("caption_prefix"), caption_suffix=get("caption_suffix"),
        caption_dropout_rate=get("caption_dropout_rate", 0.0),
        caption_dropout_every_n_epochs=get("caption_dropout_every_n_epochs", 0),
        caption_tag_dropout_rate=get("caption_tag_dropout_rate", 0.0),
        token_warmup_min=get("token_warmup_min", 1), token_warmup_step=get("token_warmup_step", 0))
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        _check_range(where, name, getattr(caption, name), 0, 1)
    for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
        _check_range(where, name, getattr(caption, name), 0)
    if not caption.caption_separator:
        raise UserError(f"{where}: `caption_separator` must not be empty")

    for key in ("face_crop_aug_range", "cache_info"):
        if get(key):
            raise UserError(f"{where}: `{key}` (from the config or --{key}) is not supported: {UNSUPPORTED_KEYS[key]}")

    num_repeats = get("num_repeats", 1)
    if num_repeats < 1:
        raise UserError(f"{where}: `num_repeats` = {num_repeats} must be at least 1 (kohya silently skips such a "
                        f"subset; remove the subset instead)")
    interpolation = get("resize_interpolation")
    if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
        raise UserError(f"{where}: `resize_interpolation` = {interpolation!r}; expected one of "
                        f"{', '.join(RESIZE_INTERPOLATIONS)}")
    masks = levels[0].get("conditioning_data_dir")
    if masks is not None and get("random_crop", False):
        raise UserError(f"{where}: `random_crop` (from the config or --random_crop) cannot be used with mask images "
                        f"(conditioning_data_dir): kohya refuses it too, masks are centre-cropped like the images")
    extension = get("caption_extension", ".caption")
    if extension and not extension.startswith("."):
        extension = "." + extension  # kohya adds the dot too
    return SubsetConfig(
        image_dir=levels[0].get("image_dir"), metadata_file=levels[0].get("metadata_file") if finetune else None,
        # kohya's mask datasets have no regularisation images, alpha masks or class tokens
        is_reg=levels[0].get("is_reg", False), alpha_mask=masks is None and get("alpha_mask", False),
        conditioning_data_dir=masks, class_tokens=None if finetune or masks is not None else get("class_tokens"),
        caption_extension=extension,
        num_repeats=num_repeats, color_aug=get("color_aug", False), flip_aug=get("flip_aug", False),
        random_crop=get("random_crop", False), resize_interpolation=interpolation,
        custom_attributes=get("custom_attributes") or {}, caption=caption, where=where)


def _resolve_dataset(ds, general, argcfg, where, source):
    finetune = all("metadata_file" in s for s in ds["subsets"])
    levels = [ds, general, argcfg]

    def get(key, default=None):
        return _lookup(key, levels, default)

    subsets, problems = [], []
    seen = set()
    for j, sub in enumerate(ds["subsets"]):
        swhere = f"datasets[{where}].subsets[{j}] of {source}"
        try:
            subset = _resolve_subset([sub, ds, general, argcfg], finetune, swhere)
        except UserError as e:
            _collect(problems, e)
            continue
        identity = subset.metadata_file if finetune else subset.image_dir
        if identity in seen:
            raise UserError(f"{swhere}: {identity} is already used by another subset of this dataset (kohya would "
                            f"silently drop this one); remove the duplicate")
        seen.add(identity)
        subsets.append(subset)
    _raise_problems(problems, source)

    dwhere = f"datasets[{where}] of {source}"
    resolution = get("resolution")
    if resolution is None:
        raise UserError(f"{dwhere}: no resolution; set `resolution` in [general] or [[datasets]], or pass --resolution")
    resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if min(resolution) <= 0:
        raise UserError(f"{dwhere}: `resolution` = {list(resolution)} must be positive")
    config = DatasetConfig(
        subsets=tuple(subsets), is_dreambooth=not finetune, resolution=resolution,
        batch_size=get("batch_size", 1), enable_bucket=get("enable_bucket", False),
        min_bucket_reso=get("min_bucket_reso", 256), max_bucket_reso=get("max_bucket_reso", 1024),
        bucket_reso_steps=get("bucket_reso_steps", 64), bucket_no_upscale=get("bucket_no_upscale", False),
        network_multiplier=get("network_multiplier", 1.0), resize_interpolation=get("resize_interpolation"),
        validation_split=get("validation_split", 0.0), validation_seed=get("validation_seed"),
        prior_loss_weight=argcfg.get("prior_loss_weight", 1.0), true_crop_top_left=get("true_crop_top_left", False),
        skip_corrupt_images=argcfg.get("skip_corrupt_images", False), debug_dataset=argcfg.get("debug_dataset", False),
        where=dwhere)
    _check_range(dwhere, "batch_size", config.batch_size, 1)
    _check_range(dwhere, "bucket_reso_steps", config.bucket_reso_steps, 8)
    _check_range(dwhere, "validation_split", config.validation_split, 0, 1)
    if config.bucket_reso_steps % 8:
        raise UserError(f"{dwhere}: `bucket_reso_steps` = {config.bucket_reso_steps} must be a multiple of 8 "
                        f"(the VAE's downscale factor); SDXL needs a multiple of 32, kohya's default is 64")
    if config.validation_split > 0 and finetune:
        raise UserError(f"{dwhere}: `validation_split` only works for DreamBooth-style datasets (kohya ignores it for "
                        f"fine-tuning ones and validates on the training images); remove it")
    return config


def resolve_dataset_configs(args):
    """Validated DatasetConfigs from kohya's dataset options (see add_dataset_arguments).

    With --dataset_config the legacy options --train_data_dir/--reg_data_dir/--in_json are
    ignored (with a warning, as kohya does); every other option acts as a fallback default.
    """
    argcfg = _args_as_config(args)
    if args.dataset_config is not None:
        if args.train_data_dir or args.reg_data_dir or args.in_json:
            logger.warning("--dataset_config is given, so --train_data_dir, --reg_data_dir and --in_json are ignored")
        source = args.dataset_config
        user = load_config_file(source)
        validate_user_config(user, source, getattr(args, "masked_loss", False))
    else:
        source, user = _legacy_config(args)
    general = user.get("general", {})
    # a value error stops its own subset or dataset only, so the others are checked too
    configs, problems = [], []
    for i, ds in enumerate(user["datasets"]):
        try:
            configs.append(_resolve_dataset(ds, general, argcfg, i, source))
        except UserError as e:
            _collect(problems, e)
    _raise_problems(problems, source)
    return configs


def _legacy_config(args):
    """kohya's config for --train_data_dir/--reg_data_dir (DreamBooth folders) or --in_json."""
    if args.train_data_dir is None:
        raise UserError("no dataset: pass --dataset_config, or --train_data_dir (with `N_class` folders or --in_json)")
    if not os.path.isdir(args.train_data_dir):
        raise UserError(f"--train_data_dir {args.train_data_dir} is not a directory")
    if args.in_json is not None:
        if not os.path.isfile(args.in_json):
            raise UserError(f"--in_json {args.in_json} not found")
        subsets = [{"image_dir": args.train_data_dir, "metadata_file": args.in_json}]
        return "--in_json", {"datasets": [{"subsets": subsets}]}
    subsets = dreambooth_subsets_from_folders(args.train_data_dir, False)
    if not subsets:
        raise UserError(f"--train_data_dir {args.train_data_dir} has no `N_class` folders (e.g. `10_sks dog`: "
                        f"10 repeats, class tokens 'sks dog')")
    if args.reg_data_dir is not None:
        if not os.path.isdir(args.reg_data_dir):
            raise UserError(f"--reg_data_dir {args.reg_data_dir} is not a directory")
        subsets += dreambooth_subsets_from_folders(args.reg_data_dir, True)
    return "--train_data_dir", {"datasets": [{"subsets": subsets}]}


def dreambooth_subsets_from_folders(parent, is_reg):
    """kohya's `N_identifier class` folders: the immediate sub-folders of `parent` whose name starts
    with an integer N >= 1 and "_"; N is num_repeats and the rest is class_tokens. Others are
    skipped with a warning, as kohya does. Sorted by name (kohya uses directory order)."""
    subsets = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not os.path.isdir(path):
            continue
        head, _, rest = name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            logger.warning("ignoring folder %s: its name does not start with a repeat count like `10_`", path)
            continue
        if repeats < 1:
            logger.warning("ignoring folder %s: repeat count %d is below 1", path, repeats)
            continue
        subsets.append({"image_dir": path, "num_repeats": repeats, "is_reg": is_reg, "class_tokens": rest})
    return subsets
