"""Models and their calling convention: `forward(call, batch) -> logits` (`forward`), the demo's TinyGPT
(`tiny_gpt`) and Hugging Face causal LMs (`hf`: build, LoRA, packed masks, GGUF export).
models imports only `dataflex.utils`."""
