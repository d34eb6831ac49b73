"""flaxlm model: config, layers, transformer, sharding, generation, tokenizer."""
