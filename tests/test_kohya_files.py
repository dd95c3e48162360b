"""A kohya user's existing files and command lines: a --config_file as the kohya_ss GUI writes
it, every bad key of a file in one run, and the messages for kohya options that this port
spells differently. All of it fails or passes before any model is loaded."""

import pytest

from conftest import ONE_BLOCK, run_tool
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


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp("kohya_files") / "img" / "2_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "a.png")
    return folder.parent


def _prepare(tiny_ckpt, images, out, *extra):
    from library.training.plan import prepare
    _, args = parse_args(["--pretrained_model_name_or_path", str(tiny_ckpt), "--network_module",
                          "networks.lora", "--output_dir", str(out), "--train_data_dir",
                          str(images), "--resolution", "64", *map(str, extra)])
    return prepare(args)


@pytest.mark.parametrize("extra, message", [
    (["--log_with", "tensorboard"], "--log_with tensorboard needs --logging_dir"),
    (["--lr_scheduler_type", "CosineAnnealingLR"],
     "--lr_scheduler_type CosineAnnealingLR: custom scheduler classes are not supported; "
     "--lr_scheduler cosine is the same schedule"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.LinearLR"], "--lr_scheduler linear is the same"),
    (["--mixed_precision", "fp16", "--full_bf16"],
     "--full_bf16 needs an Ascend NPU: MindSpore has no bfloat16 matmul kernel on CPU; use "
     "--mixed_precision fp16 --full_fp16"),
    (["--text_encoder_lr1", "1e-5"], "--text_encoder_lr1 is not an option of kohya's "
     "sdxl_train_network.py either (its SDXL document shows it): use --text_encoder_lr TE1_LR TE2_LR"),
])
def test_kohya_spellings_get_a_message_that_names_the_fix(tiny_ckpt, images, tmp_path, extra,
                                                          message):
    from library.errors import UserError
    with pytest.raises(UserError) as e:
        _prepare(tiny_ckpt, images, tmp_path, *extra)
    assert message in str(e.value)


def test_save_model_as_ckpt_is_one_line_saying_why(tiny_ckpt, images, tmp_path):
    proc = run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_ckpt,
                    "--network_module", "networks.lora", "--output_dir", tmp_path,
                    "--train_data_dir", images, "--resolution", "64", "--save_model_as", "ckpt",
                    check=False)
    assert proc.returncode == 2 and "usage:" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --save_model_as ckpt: only safetensors is written (kohya's ckpt and pt are pickle "
        "files, which can run code when loaded); drop the option or pass safetensors")


def test_attention_flags_say_they_change_nothing(tiny_ckpt, images, tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO)
    _prepare(tiny_ckpt, images, tmp_path, "--sdpa", "--xformers")
    notes = [r.getMessage() for r in caplog.records if "has no effect here" in r.getMessage()]
    assert [n.split()[0] for n in notes] == ["--sdpa", "--xformers"]
    assert "Ascend's flash attention on NPUs, math attention on CPU" in notes[0]


def _events(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files under `folder`."""
    import struct
    from tensorboardX.proto import event_pb2
    out = []
    for path in folder.rglob("events.out.tfevents*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):      # TFRecord: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            pos += 12 + length + 4
    return out


def _first_loss(log):
    import json
    return next(r["loss/current"] for r in map(json.loads, open(log)) if r.get("step") == 1)


def test_a_gui_config_with_mask_images_and_adamw8bit_trains(tiny_ckpt, tmp_path):
    """Acceptance of issue 12 in one CLI run (PyNative, so no graph compile): a GUI-written
    --config_file (AdamW8bit, scalar text_encoder_lr, max_token_length = 75, dynamo_backend = "no",
    GUI-only keys) with a mask-image dataset, cached latents and --masked_loss; the last step's
    save, loss/epoch_average in TensorBoard; and a loss that differs from the unmasked run's."""
    from library.safetensors_io import SafetensorsFile
    from test_data_masks import mask_dataset, write_toml
    img, msk = mask_dataset(tmp_path / "data", sizes=((64, 64),))     # one step an epoch
    masked_toml = write_toml(tmp_path / "masked.toml", img, msk)
    plain_toml = tmp_path / "plain.toml"
    plain_toml.write_text(masked_toml.read_text().replace(f'conditioning_data_dir = "{msk}"', ""))
    runs = {}
    # PyNative, one step each (also the last step's save); the LoRA on one block (ONE_BLOCK, on
    # the command line over the GUI's empty network_args) keeps that step to seconds
    for name, dataset, masked in (("masked", masked_toml, "masked_loss = true\n"),
                                  ("plain", plain_toml, "")):
        out = tmp_path / name
        cfg = tmp_path / f"{name}_config.toml"
        cfg.write_text(GUI_CONFIG + masked + f"""
cache_latents = true
cache_text_encoder_outputs = true
network_train_unet_only = true
dataset_config = "{dataset}"
log_with = "tensorboard"
logging_dir = "{tmp_path / name / 'logs'}"
max_train_steps = 1
output_dir = "{out}"
output_name = "gui"
pretrained_model_name_or_path = "{tiny_ckpt}"
save_every_n_steps = 1
seed = 7
""")
        proc = run_tool("sdxl_train_network.py", "--config_file", cfg, "--pynative",
                        "--network_args", ONE_BLOCK)
        runs[name] = _first_loss(out / "gui_log.jsonl")
        assert "ignoring epoch, noise_offset_type" in proc.stderr
        assert "--optimizer_type AdamW8bit: running AdamW" in proc.stderr
    out = tmp_path / "masked"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["gui-step00000001.safetensors",
                                                                 "gui.safetensors"]
    md = SafetensorsFile(out / "gui.safetensors").metadata
    assert md["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert md["ss_optimizer"].endswith("for --optimizer_type AdamW8bit: 32-bit state, no bitsandbytes")
    assert md["ss_max_token_length"] == "None" and md["ss_text_encoder_lr"] == "5e-05"
    epoch_average = [(step, v) for tag, step, v in _events(out / "logs") if tag == "loss/epoch_average"]
    assert [step for step, _ in epoch_average] == [1] and epoch_average[0][1] > 0
    # the mask (white left half, grey right half) weights the loss: not the unmasked loss
    assert runs["masked"] != pytest.approx(runs["plain"], rel=1e-4), runs


def test_masked_loss_without_any_mask_warns_and_trains_unmasked(tiny_ckpt, images, tmp_path,
                                                                 caplog):
    plan = _prepare(tiny_ckpt, images, tmp_path, "--masked_loss")
    assert not plan.loss_options.masked
    assert any("--masked_loss: no subset has mask images (conditioning_data_dir) or alpha_mask"
               in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert _prepare(tiny_ckpt, images, tmp_path, "--masked_loss", "--alpha_mask").loss_options.masked
