"""minivlm: QLoRA fine-tuning of vision-language models in plain PyTorch."""
