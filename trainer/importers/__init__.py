"""Importers: turn an outside model (a GGUF file, a Hugging Face folder) into a checkpoint.

Each writes a normal checkpoint folder (see trainer/checkpoint.py) with fp32 weights, the
tokenizer and `meta.json` lineage naming the source, so fine-tuning, export and serving treat an
imported model like one trained here.
"""

from trainer.importers.gguf import import_gguf
from trainer.importers.hf import import_hf

__all__ = ["import_gguf", "import_hf"]
