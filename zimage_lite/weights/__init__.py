"""Checkpoints: reading and writing the files, naming their tensors, loading them into models.

One reader per container format, both implementing `checkpoint.Checkpoint`:
  checkpoint.py          the `Checkpoint` protocol, `open_checkpoint` (picks the reader by content),
                         `detect` (which Z-Image component a file holds, or what else it is)
  safetensors.py         `SafetensorsCheckpoint`: a file, a folder of shards or an index; mmap views
  fp8.py                 ComfyUI's FP8 conventions (variants, scales), consulted by the safetensors reader
  gguf.py                `GGUFCheckpoint`: ComfyUI-GGUF, stable-diffusion.cpp and llama.cpp files
  safetensors_writer.py  `SafetensorsStreamWriter`; gguf_writer.py: `GGUFStreamWriter` (tensor by tensor)
  gguf_tokenizer.py      the tokenizer llama.cpp keeps in GGUF metadata; gguf_qwen3.py: its `qwen3.*` keys
  mapping.py             paging hints for mapped reads
Names and loading:
  names_dit.py, names_qwen3.py, names_vae.py   tensor names per component, checkpoint <-> ours
  loaders.py             a component from any format, onto a model built on the meta device
  load.py                strict loading; components.py: find the components of a model folder
"""
