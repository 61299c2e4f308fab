"""The converter: diffusers folders, ComfyUI files and GGUFs -> GGUF / FP8 files (see converter.py)."""
