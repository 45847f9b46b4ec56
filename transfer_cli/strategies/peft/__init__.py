"""Parameter-efficient transfer: the pretrained body stays frozen and bit-identical, a few new or selected
parameters train with the head (LoRA and its peft relatives, adapters, BitFit, prompts, SSF)."""
from transfer_cli.strategies.peft import adapter, bitfit, lora, ssf, vpt  # noqa: F401  (registration)
