"""mlx-tune: unattended LoRA/QLoRA fine-tuning on Apple Silicon."""
__version__ = "0.1.0"
