"""finetune-recipes: reproducible LoRA / QLoRA fine-tuning recipes run by DVC."""

__version__ = "0.1.0"
