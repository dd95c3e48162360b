"""The command line of sdxl_train_network.py: kohya's option names and defaults.

Every kohya option this port implements is defined here (or by the dataset and cache modules,
which own theirs). Every other option kohya's sdxl_train_network.py accepts is still known by
name, and passing it is an error that names it: a kohya user gets a clear "not supported yet"
instead of argparse's "unrecognized arguments", and never a silently ignored flag.

`--config_file` works as in kohya: the TOML's tables are flattened, values fill the options the
command line did not set (command line > file > defaults). Unlike kohya, a key the parser does
not know, or a value of the wrong type, is an error naming the key and the file.
"""

import argparse
import logging
import os

import toml

from library.data.cache import add_cache_arguments
from library.data.config import add_dataset_arguments
from library.errors import UserError
from library.training.samples import add_sample_arguments
from library.training.validation import add_validation_arguments
from library.training.schedules import SCHEDULERS, int_or_float

logger = logging.getLogger(__name__)

# kohya options that are not implemented (yet), with what to do instead.
UNSUPPORTED = {
    # model loading / attention / compilation
    "v2": "SD 2.x is not SDXL; kohya refuses it for SDXL too",
    "tokenizer_cache_dir": "the CLIP tokenizers ship with this port (configs/clip_tokenizer)",
    "disable_mmap_load_safetensors": "checkpoints are always memory-mapped",
    "torch_compile": "training always runs as a compiled MindSpore graph",
    "dynamo_backend": "training always runs as a compiled MindSpore graph",
    "lowram": "PyTorch device placement options have no MindSpore equivalent",
    "highvram": "PyTorch device placement options have no MindSpore equivalent",
    "cpu_offload_checkpointing": "not supported for SDXL (kohya fails with it too)",
    "fp8_base": "fp8 weights are not supported",
    "fp8_base_unet": "fp8 weights are not supported",
    "ddp_timeout": "distributed training uses msrun, see the README",
    "ddp_gradient_as_bucket_view": "distributed training uses msrun, see the README",
    "ddp_static_graph": "distributed training uses msrun, see the README",
    "deepspeed": "DeepSpeed is PyTorch-only",
    "zero_stage": "DeepSpeed is PyTorch-only",
    "offload_optimizer_device": "DeepSpeed is PyTorch-only",
    "offload_optimizer_nvme_path": "DeepSpeed is PyTorch-only",
    "offload_param_device": "DeepSpeed is PyTorch-only",
    "offload_param_nvme_path": "DeepSpeed is PyTorch-only",
    "zero3_init_flag": "DeepSpeed is PyTorch-only",
    "zero3_save_16bit_model": "DeepSpeed is PyTorch-only",
    "fp16_master_weights_and_gradients": "DeepSpeed is PyTorch-only",
    "dataset_class": "custom Python dataset classes are not supported; use --dataset_config",
    "initial_epoch": "start-position options are not supported yet",
    "initial_step": "start-position options are not supported yet",
    "skip_until_initial_step": "start-position options are not supported yet",
    "use_8bit_adam": "8-bit optimizers need bitsandbytes (CUDA); use AdamW",
    "fused_backward_pass": "not used by LoRA training",
    "lr_scheduler_type": "custom scheduler classes are not supported; use --lr_scheduler",
    "lr_scheduler_args": "custom scheduler classes are not supported; use --lr_scheduler",
    "zero_terminal_snr": "not supported yet",
    "scale_weight_norms": "not supported yet",
    "base_weights": "not supported yet; merge LoRAs into the model with tools/merge_lora.py",
    "base_weights_multiplier": "not supported yet; merge LoRAs with tools/merge_lora.py",
    # hub upload and metadata extras
    "huggingface_repo_id": "uploading to the Hugging Face hub is not supported",
    "huggingface_repo_type": "uploading to the Hugging Face hub is not supported",
    "huggingface_path_in_repo": "uploading to the Hugging Face hub is not supported",
    "huggingface_token": "uploading to the Hugging Face hub is not supported",
    "huggingface_repo_visibility": "uploading to the Hugging Face hub is not supported",
    "save_state_to_huggingface": "uploading to the Hugging Face hub is not supported",
    "resume_from_huggingface": "uploading to the Hugging Face hub is not supported",
    "async_upload": "uploading to the Hugging Face hub is not supported",
    "metadata_thumbnail": "not supported yet",
    "metadata_merged_from": "not supported yet",
    "metadata_trigger_phrase": "not supported yet",
    "metadata_preprocessor": "not supported yet",
    "metadata_is_negative_embedding": "not supported yet",
    "metadata_usage_hint": "not supported yet",
    # experiment trackers other than TensorBoard
    "log_tracker_name": "only TensorBoard logging (--logging_dir) is supported",
    "wandb_run_name": "only TensorBoard logging (--logging_dir) is supported",
    "log_tracker_config": "only TensorBoard logging (--logging_dir) is supported",
    "wandb_api_key": "only TensorBoard logging (--logging_dir) is supported",
    "log_config": "only TensorBoard logging (--logging_dir) is supported",
}


class _Unsupported(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        kwargs.pop("nargs", None)
        super().__init__(option_strings, dest, nargs="*", default=None, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} is a kohya option this port does not support: "
                        f"{UNSUPPORTED[self.dest]}")


def _add_model_arguments(a):
    a("--pretrained_model_name_or_path", type=str, default=None,
      help="SDXL base: single-file .safetensors, diffusers folder or Hugging Face hub id")
    a("--vae", type=str, default=None, help="replace the VAE: an SDXL checkpoint or VAE file/folder")
    a("--v_parameterization", action="store_true", help="v-prediction target")
    a("--max_token_length", type=int, default=None, choices=[None, 150, 225],
      help="caption token budget: 75 (default), 150 or 225")
    a("--clip_skip", type=int, default=None, help="ignored for SDXL (as kohya); written to metadata")
    for name in ("sdpa", "xformers", "mem_eff_attn"):
        a(f"--{name}", action="store_true",
          help="accepted for kohya compatibility: memory-efficient attention is chosen per device "
               "(Ascend's flash attention on NPUs, math attention on CPU)")
    a("--no_half_vae", action="store_true", help="keep the VAE in float32 with mixed precision")


def _add_training_arguments(a):
    a("--output_dir", type=str, default=None)
    a("--output_name", type=str, default=None)
    a("--save_model_as", type=str, default="safetensors", choices=["safetensors"],
      help="only safetensors (kohya's ckpt/pt are pickle files)")
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    a("--save_every_n_epochs", type=int, default=None)
    a("--save_every_n_steps", type=int, default=None)
    a("--save_n_epoch_ratio", type=int, default=None)
    a("--save_last_n_epochs", type=int, default=None)
    a("--save_last_n_steps", type=int, default=None)
    a("--save_state", action="store_true",
      help="with each epoch/step save, also save the training state (<name>-...-state folders) "
           "and <name>-state at the end; --resume continues from one exactly")
    a("--save_state_on_train_end", action="store_true", help="save only the final <name>-state")
    a("--save_last_n_epochs_state", type=int, default=None,
      help="keep this many epoch states (default: --save_last_n_epochs)")
    a("--save_last_n_steps_state", type=int, default=None,
      help="keep the step states of this many last steps (default: --save_last_n_steps)")
    a("--resume", type=str, default=None, help="a state folder to continue training from")
    a("--no_metadata", action="store_true")
    for field in ("title", "author", "description", "license", "tags"):
        a(f"--metadata_{field}", type=str, default=None)
    a("--training_comment", type=str, default=None)

    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int, default=None)
    a("--seed", type=int, default=None)
    a("--gradient_checkpointing", action="store_true")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    a("--full_fp16", action="store_true")
    a("--full_bf16", action="store_true")
    a("--pynative", action="store_true",
      help="(this port) run the step op by op instead of as a compiled graph: no compile time, "
           "slower steps; for debugging and quick checks")
    a("--static_shapes", action="store_true",
      help="(this port) one step graph per batch shape (bucket and batch length) instead of "
           "the default one graph for every shape; for comparison, and a fallback")
    a("--compile_all_buckets_first", action="store_true",
      help="(this port) with --static_shapes: compile the step graph of every batch shape "
           "before step 1, with a progress bar, instead of at each shape's first batch. (The "
           "default dynamic-shape step is always compiled before step 1.)")
    a("--compile_cache_dir", type=str, default=None,
      help="(this port) where compiled step graphs are kept between runs, one folder per hash "
           "of everything that shapes them (default: ~/.cache/sdxl_train_network/compile)")
    a("--no_compile_cache", action="store_true",
      help="(this port) compile the step graphs from scratch and keep nothing for later runs")
    a("--max_bucket_count", type=int, default=None,
      help="(this port) keep at most N bucket shapes (the most populated); images of the "
           "others go to the kept bucket nearest their aspect ratio. Fewer graphs to compile")
    a("--config_file", type=str, default=None)
    a("--output_config", action="store_true")

    a("--optimizer_type", type=str, default="")
    a("--optimizer_args", type=str, nargs="*", default=None)
    a("--use_lion_optimizer", action="store_true")
    a("--learning_rate", type=float, default=2e-6)
    a("--max_grad_norm", type=float, default=1.0)
    a("--lr_scheduler", type=str, default="constant", choices=SCHEDULERS)
    a("--lr_warmup_steps", type=int_or_float, default=0)
    a("--lr_decay_steps", type=int_or_float, default=0)
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1)
    a("--lr_scheduler_timescale", type=int, default=None)
    a("--lr_scheduler_min_lr_ratio", type=float, default=None)

    a("--noise_offset", type=float, default=None)
    a("--noise_offset_random_strength", action="store_true")
    a("--adaptive_noise_scale", type=float, default=None)
    a("--multires_noise_iterations", type=int, default=None)
    a("--multires_noise_discount", type=float, default=0.3)
    a("--ip_noise_gamma", type=float, default=None)
    a("--ip_noise_gamma_random_strength", action="store_true")
    a("--min_timestep", type=int, default=None)
    a("--max_timestep", type=int, default=None)
    a("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    a("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"])
    a("--huber_c", type=float, default=0.1)
    a("--huber_scale", type=float, default=1.0)
    a("--min_snr_gamma", type=float, default=None)
    a("--scale_v_pred_loss_like_noise_pred", action="store_true")
    a("--v_pred_like_loss", type=float, default=None)
    a("--debiased_estimation_loss", action="store_true")
    a("--masked_loss", action="store_true")

    a("--logging_dir", type=str, default=None, help="TensorBoard logs go to <dir>/<prefix><time>")
    a("--log_prefix", type=str, default=None)
    a("--log_with", type=str, default=None, choices=[None, "tensorboard"])
    a("--console_log_level", type=str, default=None,
      choices=[None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    a("--console_log_file", type=str, default=None)
    a("--console_log_simple", action="store_true")


def _add_network_arguments(a):
    a("--network_module", type=str, default=None, help="networks.lora")
    a("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    a("--network_alpha", type=float, default=1, help="LoRA alpha (scale = alpha / dim)")
    a("--network_dropout", type=float, default=None)
    a("--network_args", type=str, nargs="*", default=None)
    a("--network_weights", type=str, default=None, help="start from these LoRA weights")
    a("--dim_from_weights", action="store_true")
    a("--network_train_unet_only", action="store_true")
    a("--network_train_text_encoder_only", action="store_true")
    a("--unet_lr", type=float, default=None)
    a("--text_encoder_lr", type=float, nargs="*", default=None,
      help="one value for both text encoders (kohya), or two: TE1 then TE2")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sdxl_train_network.py",
        description="Train a LoRA for SDXL with kohya-ss/sd-scripts' options, on MindSpore.")
    a = parser.add_argument
    _add_model_arguments(a)
    add_dataset_arguments(parser)
    add_cache_arguments(parser)
    _add_training_arguments(a)
    _add_network_arguments(a)
    add_sample_arguments(parser)
    add_validation_arguments(parser)
    for name in UNSUPPORTED:
        a(f"--{name}", action=_Unsupported)
    return parser


# --- --config_file ---------------------------------------------------------------------------

def _flatten(table):
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def _check_config_value(action, key, value, path):
    expected = None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        ok, expected = isinstance(value, bool), "true or false"
    elif action.nargs in ("*", "+"):
        ok, expected = isinstance(value, list), "a list"
    elif action.type is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif action.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    else:
        ok = True
    if action.choices is not None and ok and value not in action.choices:
        ok, expected = False, f"one of {[c for c in action.choices if c is not None]}"
    if not ok:
        raise UserError(f"{path}: `{key} = {value!r}` should be {expected}")
    if action.type is int_or_float:
        return int_or_float(value)
    return value


def apply_config_file(parser, args, argv):
    """Fill options the command line did not set from --config_file's TOML (kohya's rule)."""
    path = args.config_file
    if not path.endswith(".toml"):
        path = path + ".toml"   # kohya appends the suffix when it is missing
    if not os.path.isfile(path):
        raise UserError(f"--config_file {path} not found")
    try:
        values = _flatten(toml.load(path))
    except toml.TomlDecodeError as e:
        raise UserError(f"--config_file {path} is not valid TOML: {e}") from None
    actions = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        if key not in actions or key == "help":
            raise UserError(f"{path}: unknown option `{key}` (not an sdxl_train_network.py option)")
        if key in UNSUPPORTED:
            raise UserError(f"{path}: `{key}` is a kohya option this port does not support: "
                            f"{UNSUPPORTED[key]}")
        defaults[key] = _check_config_value(actions[key], key, value, path)
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def write_config_file(parser, args):
    """--output_config: write the options that differ from the defaults to --config_file."""
    if not args.config_file:
        raise UserError("--output_config needs --config_file PATH to write to")
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} exists; it is not overwritten")
    defaults = {a.dest: a.default for a in parser._actions}
    skip = {"config_file", "output_config", "help"}
    changed = {k: v for k, v in vars(args).items()
               if k not in skip and v is not None and v != defaults.get(k)}
    from library.safetensors_io import write_atomically
    write_atomically(path, [toml.dumps(changed).encode()])
    return path


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file and not args.output_config:
        args = apply_config_file(parser, args, argv)
    return parser, args
