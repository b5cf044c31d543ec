"""The unified replica's core: one device shared by the encoder and the llm, decode steps first."""
