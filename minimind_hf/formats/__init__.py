"""Weight layouts other than this project's HF directories, one module each: `pth` (the original's `.pth`),
`llama` (the Llama export), `lora_pth` (the original's LoRA adapter files). `minimind_hf.loading` decides which
one a source needs; `python -m minimind_hf.convert` writes them."""
