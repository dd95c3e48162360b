"""SDXL image generation with kohya-ss/sd-scripts' sdxl_gen_img.py command line, on MindSpore.

    python sdxl_gen_img.py --ckpt sd_xl_base_1.0.safetensors --prompt "a cat --n blurry --d 1" \
        --network_module networks.lora --network_weights my_lora.safetensors --outdir images

The options (kohya's names and defaults, and the ones kohya has that this port rejects by name)
are library/generation/args.py; what the run does is library/generation/cli.py.
"""

from library.errors import exit_on_user_error


def main(argv=None):
    from library.generation.args import setup_parser
    args = setup_parser().parse_args(argv)
    from library.generation import cli
    return exit_on_user_error(lambda: cli.run(args))


if __name__ == "__main__":
    main()
