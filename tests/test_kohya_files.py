"""A kohya user's existing files and command lines: a --config_file as the kohya_ss GUI writes
it, every bad key of a file in one run, and the messages for kohya options that this port
spells differently. All of it fails or passes before any model is loaded."""

import pytest

from conftest import run_tool
from library.training.args import parse_args

# the shape of a config the kohya_ss GUI (kohya_gui/lora_gui.py) writes for an SDXL LoRA: flat,
# sorted, with its own keys and its "off" values
GUI_CONFIG = """
bucket_reso_steps = 64
caption_extension = ".txt"
dynamo_backend = "no"
enable_bucket = true
epoch = 4
gradient_accumulation_steps = 1
learning_rate = 0.0001
lr_scheduler = "constant"
lr_scheduler_args = []
max_data_loader_n_workers = 0
max_token_length = 75
network_alpha = 16
network_args = []
network_dim = 8
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_type = "AdamW8bit"
persistent_data_loader_workers = 1
sdpa = true
stop_text_encoder_training = 2
text_encoder_lr = 5e-05
train_inpainting = true
wandb_run_name = "my_lora"
"""


def test_a_gui_written_config_is_read_as_kohya_reads_it(tmp_path, caplog):
    cfg = tmp_path / "config_lora-20260101-000000.toml"
    cfg.write_text(GUI_CONFIG)
    _, args = parse_args(["--config_file", str(cfg)])
    assert args.max_token_length is None            # 75 = kohya's default, no extension
    assert args.text_encoder_lr == [5e-05]          # a scalar, as kohya takes it
    assert args.persistent_data_loader_workers is True and args.network_dim == 8
    assert args.optimizer_type == "AdamW8bit" and args.sdpa
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "ignoring epoch, noise_offset_type, stop_text_encoder_training, train_inpainting, " \
           "wandb_run_name" in warning and cfg.name in warning


def test_every_bad_key_of_a_config_file_is_reported_in_one_run(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('dynamo_backend = "inductor"\nnetwork_dimm = 8\nlearning_rate = "fast"\n'
                   'max_token_length = 100\nzero_terminal_snr = true\n')
    proc = run_tool("sdxl_train_network.py", "--config_file", cfg, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error: "):]
    assert message.startswith("error: 5 problems in --config_file")
    for fragment in ("`dynamo_backend` is a kohya option this port does not support",
                     "unknown option `network_dimm`", "did you mean `network_dim`",
                     "`learning_rate = 'fast'` should be a number",
                     "`max_token_length = 100` should be one of [150, 225]", "`zero_terminal_snr`"):
        assert fragment in message, message
