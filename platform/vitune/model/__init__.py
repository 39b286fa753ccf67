"""The model: image preprocessing, vision tower, projector, the VLM, the decode loop, model folders."""

import logging

# peft (model.lora) imports bitsandbytes when it is installed; on a CPU with AVX512-BF16 that import tries to fetch
# an optional kernel from the Hugging Face hub and logs a warning when it cannot, then falls back to its own
# (correct) kernel. Set here, before any submodule imports peft, so it does not print on every LoRA run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
