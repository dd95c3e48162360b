"""Networks trained on top of the frozen SDXL models (`--network_module networks.lora`)."""
