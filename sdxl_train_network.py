"""Train a LoRA for SDXL with kohya-ss/sd-scripts' command line, on MindSpore.

    python sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config my_data.toml --network_module networks.lora --network_dim 32 \
        --output_dir out --output_name my_lora --max_train_epochs 10 --learning_rate 1e-4

See README.md for the options, and `--help`.
"""

import contextlib
import logging
import os
import sys

from library.errors import exit_on_user_error


def main(argv=None):
    under_msrun = bool(os.environ.get("MS_ROLE"))
    failures = contextlib.nullcontext()
    if under_msrun:
        # join the job before anything can fail; later errors name the rank
        from library.training.distributed import join_msrun_job, report_failure
        join_msrun_job()
        failures = report_failure()
    with failures:
        from library.training.args import parse_args, write_config_file
        parser, args = parse_args(argv)
        logging.basicConfig(level=args.console_log_level or "INFO", filename=args.console_log_file,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                            if not args.console_log_simple else "%(message)s")
        if args.output_config:
            print(f"wrote {write_config_file(parser, args)}")
            return
        from library.training.interrupts import Interrupted
        from library.training.loop import train
        from library.training.plan import prepare
        try:
            plan = prepare(args)     # every check that needs no model, before MindSpore's import
            if not under_msrun:
                from library import device
                device.configure()
            train(plan)
        except KeyboardInterrupt:   # Ctrl-C before the first step (library.training.interrupts)
            raise Interrupted("stopped before training started: nothing was saved") from None


if __name__ == "__main__":
    exit_on_user_error(lambda: main(sys.argv[1:]))
