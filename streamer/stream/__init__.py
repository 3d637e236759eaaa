"""The stream: record types, decoding and encoding, the batcher and the pipeline's stages."""
