"""The network: config, transformer, attention kernels, tokenizer, checkpoint loading, quantization,
the embedded checkpoint (embedded/). Never imports engine.denoise."""
