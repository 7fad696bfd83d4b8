"""The lean PyTorch trainer: a LLaMA-style decoder, its tokenizer, data pipeline and training loop."""
