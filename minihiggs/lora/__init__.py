"""LoRA without peft: `apply` (LoRALinear, target matching, state dicts, merging), `adapter` (PEFT-format
adapter files), `export` (merge an adapter into a full checkpoint)."""
